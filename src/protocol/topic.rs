pub fn valid_topic_name(s: &str) -> bool {
    !s.is_empty() && !s.contains(['+', '#'])
}
pub fn valid_topic_filter(s: &str) -> bool {
    !s.is_empty()
}
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    let r = filter.strip_prefix("$share/")?;
    let (g, f) = r.split_once('/')?;
    Some((g, f))
}
pub fn matches(_f: &str, _t: &str) -> bool {
    false
}
pub fn is_shared(f: &str) -> bool {
    f.starts_with("$share/")
}
