//! SCRAM-SHA-256 (RFC 5802, RFC 7677), server side, as an MQTT 5 enhanced-authentication
//! method: CONNECT carries client-first, AUTH 0x18 server-first, AUTH client-final, CONNACK
//! server-final.
//!
//! Owns the message grammar, the nonces and the proof check. Takes verifiers from whichever
//! password file is current when an exchange starts; knows nothing of how that file is loaded
//! or replaced, nor of packets.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use base64::prelude::{Engine, BASE64_STANDARD};
use bytes::Bytes;
use subtle::ConstantTimeEq;

use super::password::{hmac_sha256, random_bytes, sha256, PasswordFile, ScramSecrets, DEFAULT_SCRAM_ITERATIONS};
use super::{AuthExchange, AuthMethod, AuthStep};

/// Bad user name or password: the answer to every client mistake, so none tells more than another.
const REFUSED: AuthStep = AuthStep::Fail(0x86);
/// Unspecified error: the server cannot run SCRAM (no randomness), not the client's fault.
const BROKEN: AuthStep = AuthStep::Fail(0x80);
/// No legitimate SCRAM message comes close.
const MAX_MESSAGE: usize = 4096;
const FAKE_SALT_LEN: usize = 16;

pub struct ScramSha256 {
    passwords: Arc<ArcSwapOption<PasswordFile>>,
    /// Keys the made-up salts of unknown users: stable for a name within this process (so
    /// asking twice gives the same answer, as for a real user) and unpredictable from outside.
    /// None if the system random generator failed, and then no exchange can run.
    fake_key: Option<[u8; 32]>,
    #[cfg(test)]
    fixed_nonce: Option<String>,
}

impl ScramSha256 {
    pub fn new(passwords: Arc<ArcSwapOption<PasswordFile>>) -> Self {
        ScramSha256 {
            passwords,
            fake_key: random_bytes::<32>().ok(),
            #[cfg(test)]
            fixed_nonce: None,
        }
    }

    /// Uses `server_nonce` instead of a random one, so published test vectors can be replayed.
    #[cfg(test)]
    fn with_server_nonce(passwords: Arc<ArcSwapOption<PasswordFile>>, server_nonce: &str) -> Self {
        ScramSha256 { fixed_nonce: Some(server_nonce.to_owned()), ..ScramSha256::new(passwords) }
    }

    fn server_nonce(&self) -> Option<String> {
        #[cfg(test)]
        if let Some(nonce) = &self.fixed_nonce {
            return Some(nonce.clone());
        }
        random_bytes::<18>().ok().map(|bytes| BASE64_STANDARD.encode(bytes))
    }

    /// A verifier no password matches, shaped like a real one of this file.
    fn fake_secrets(&self, fake_key: &[u8; 32], user: &str, file: Option<&PasswordFile>) -> ScramSecrets {
        let salt = hmac_sha256(fake_key, format!("salt\0{user}").as_bytes());
        ScramSecrets {
            iterations: file.and_then(PasswordFile::common_scram_iterations).unwrap_or(DEFAULT_SCRAM_ITERATIONS),
            salt: salt[..FAKE_SALT_LEN].to_vec(),
            stored_key: hmac_sha256(fake_key, format!("stored\0{user}").as_bytes()),
            server_key: hmac_sha256(fake_key, format!("server\0{user}").as_bytes()),
        }
    }

    fn begin(&self, username: Option<&str>, data: Option<&[u8]>) -> Result<AwaitingFinal, AuthStep> {
        let Some(fake_key) = &self.fake_key else { return Err(BROKEN) };
        let first = ClientFirst::parse(data.ok_or(REFUSED)?).ok_or(REFUSED)?;
        if username.is_some_and(|name| name != first.user) {
            return Err(REFUSED);
        }
        let snonce = self.server_nonce().ok_or(BROKEN)?;
        let file = self.passwords.load_full();
        let (secrets, known) = match file.as_deref().and_then(|f| f.scram(&first.user)) {
            Some(secrets) => (secrets, true),
            None => (self.fake_secrets(fake_key, &first.user, file.as_deref()), false),
        };
        let nonce = format!("{}{snonce}", first.client_nonce);
        let server_first = format!("r={nonce},s={},i={}", BASE64_STANDARD.encode(&secrets.salt), secrets.iterations);
        Ok(AwaitingFinal {
            user: first.user,
            gs2_header: first.gs2_header,
            client_first_bare: first.bare,
            server_first,
            nonce,
            secrets,
            known,
        })
    }
}

impl AuthMethod for ScramSha256 {
    fn name(&self) -> &str {
        "SCRAM-SHA-256"
    }

    fn start(
        &self,
        _client_id: &str,
        username: Option<&str>,
        data: Option<&[u8]>,
    ) -> (Box<dyn AuthExchange>, AuthStep) {
        match self.begin(username, data) {
            Ok(state) => {
                let step = AuthStep::Continue(Some(Bytes::from(state.server_first.clone())));
                (Box::new(Exchange { state: Some(state), identity: None }), step)
            }
            Err(step) => (Box::new(Exchange { state: None, identity: None }), step),
        }
    }
}

struct AwaitingFinal {
    user: String,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    secrets: ScramSecrets,
    /// False for a made-up verifier: the proof is still checked, so the work is the same, but
    /// never accepted.
    known: bool,
}

struct Exchange {
    /// None once the exchange has ended, either way.
    state: Option<AwaitingFinal>,
    identity: Option<String>,
}

impl AuthExchange for Exchange {
    fn next(&mut self, data: Option<&[u8]>) -> AuthStep {
        let Some(state) = self.state.take() else { return REFUSED };
        match state.finish(data) {
            Some(server_final) => {
                self.identity = Some(state.user);
                AuthStep::Success(Some(Bytes::from(server_final)))
            }
            None => REFUSED,
        }
    }

    fn identity(&self) -> Option<String> {
        self.identity.clone()
    }
}

impl AwaitingFinal {
    /// The server-final message if the client proved it knows the password.
    fn finish(&self, data: Option<&[u8]>) -> Option<String> {
        let text = message_text(data?)?;
        // The proof is the last attribute (RFC 5802 section 7) and is not signed itself.
        let (without_proof, proof) = text.rsplit_once(",p=")?;
        let mut attributes = without_proof.split(',');
        let binding = attributes.next()?.strip_prefix("c=")?;
        let nonce = attributes.next()?.strip_prefix("r=")?;
        // Any further attributes are extensions, which we ignore but which are signed.
        if binding != BASE64_STANDARD.encode(&self.gs2_header) || nonce != self.nonce {
            return None;
        }
        let proof: [u8; 32] = BASE64_STANDARD.decode(proof).ok()?.try_into().ok()?;
        let auth_message = format!("{},{},{without_proof}", self.client_first_bare, self.server_first);
        let client_signature = hmac_sha256(&self.secrets.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(client_signature)) {
            *k = p ^ s;
        }
        let proven: bool = sha256(&client_key).ct_eq(&self.secrets.stored_key).into();
        if !(proven && self.known) {
            return None;
        }
        let server_signature = hmac_sha256(&self.secrets.server_key, auth_message.as_bytes());
        Some(format!("v={}", BASE64_STANDARD.encode(server_signature)))
    }
}

fn message_text(data: &[u8]) -> Option<&str> {
    if data.len() > MAX_MESSAGE {
        return None;
    }
    std::str::from_utf8(data).ok()
}

struct ClientFirst {
    /// Everything up to the bare message, e.g. `n,,`; client-final echoes it in `c=`.
    gs2_header: String,
    bare: String,
    user: String,
    client_nonce: String,
}

impl ClientFirst {
    fn parse(data: &[u8]) -> Option<ClientFirst> {
        let text = message_text(data)?;
        let mut fields = text.splitn(3, ',');
        let (flag, authzid, bare) = (fields.next()?, fields.next()?, fields.next()?);
        // "p=" asks for channel binding, which we do not offer; "y" says the client could but
        // thinks we cannot, which is true.
        if flag != "n" && flag != "y" {
            return None;
        }
        let authzid = match authzid {
            "" => None,
            a => Some(decode_saslname(a.strip_prefix("a=")?)?),
        };
        let mut attributes = bare.split(',');
        let user = decode_saslname(attributes.next()?.strip_prefix("n=")?)?;
        let client_nonce = attributes.next()?.strip_prefix("r=")?;
        let printable = |c: char| c.is_ascii_graphic() && c != ',';
        if user.is_empty() || client_nonce.is_empty() || !client_nonce.chars().all(printable) {
            return None;
        }
        if authzid.is_some_and(|a| a != user) {
            return None;
        }
        Some(ClientFirst {
            gs2_header: text[..text.len() - bare.len()].to_owned(),
            bare: bare.to_owned(),
            user,
            client_nonce: client_nonce.to_owned(),
        })
    }
}

/// RFC 5802 saslname: `=2C` is `,` and `=3D` is `=`; any other `=` is malformed.
fn decode_saslname(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3)?;
        out.push(match escape {
            "=2C" => ',',
            "=3D" => '=',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use hmac::{Hmac, KeyInit, Mac};
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::auth::password::hash_scram_sha256;

    /// The client's half of RFC 5802, written with the hmac crate rather than the ring HMAC the
    /// server uses.
    fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// Returns (client-final, expected server-final).
    fn client_final(password: &str, client_first_bare: &str, server_first: &str, gs2: &str) -> (String, String) {
        let mut fields = server_first.split(',');
        let nonce = fields.next().unwrap().strip_prefix("r=").unwrap();
        let salt = BASE64_STANDARD.decode(fields.next().unwrap().strip_prefix("s=").unwrap()).unwrap();
        let iterations: u32 = fields.next().unwrap().strip_prefix("i=").unwrap().parse().unwrap();
        let salted = pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c={},r={nonce}", BASE64_STANDARD.encode(gs2));
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
        let server_signature = hmac(&hmac(&salted, b"Server Key"), auth_message.as_bytes());
        (
            format!("{without_proof},p={}", BASE64_STANDARD.encode(proof)),
            format!("v={}", BASE64_STANDARD.encode(server_signature)),
        )
    }

    fn method(lines: &str) -> ScramSha256 {
        ScramSha256::new(passwords(lines))
    }

    fn passwords(lines: &str) -> Arc<ArcSwapOption<PasswordFile>> {
        let file = PasswordFile::parse(lines, "test").unwrap();
        Arc::new(ArcSwapOption::from_pointee(file))
    }

    fn server_first(step: &AuthStep) -> String {
        match step {
            AuthStep::Continue(Some(data)) => String::from_utf8(data.to_vec()).unwrap(),
            other => panic!("expected server-first, got {other:?}"),
        }
    }

    /// Runs a whole exchange as a client knowing `password` would.
    fn exchange(
        m: &ScramSha256,
        connect_user: Option<&str>,
        gs2: &str,
        bare: &str,
        password: &str,
    ) -> (Box<dyn AuthExchange>, AuthStep, String) {
        let (mut ex, step) = m.start("client", connect_user, Some(format!("{gs2}{bare}").as_bytes()));
        let first = server_first(&step);
        let (final_msg, expected) = client_final(password, bare, &first, gs2);
        let step = ex.next(Some(final_msg.as_bytes()));
        (ex, step, expected)
    }

    #[test]
    fn full_exchange_succeeds() {
        let m = method(&format!("alice:{}\n", hash_scram_sha256(b"wonderland", 4096)));
        assert_eq!(m.name(), "SCRAM-SHA-256");
        let (ex, step, expected) =
            exchange(&m, Some("alice"), "n,,", "n=alice,r=fyko+d2lbbFgONRv9qkxdawL", "wonderland");
        assert_eq!(step, AuthStep::Success(Some(Bytes::from(expected))));
        assert_eq!(ex.identity().as_deref(), Some("alice"));
        // Without a CONNECT user name, with the y flag and an authzid equal to the user.
        let (ex, step, _) = exchange(&m, None, "y,a=alice,", "n=alice,r=abc", "wonderland");
        assert!(matches!(step, AuthStep::Success(Some(_))), "{step:?}");
        assert_eq!(ex.identity().as_deref(), Some("alice"));
    }

    #[test]
    fn escaped_user_names() {
        let m = method(&format!("a,b=c:{}\n", hash_scram_sha256(b"pw", 4096)));
        let (ex, step, _) = exchange(&m, Some("a,b=c"), "n,,", "n=a=2Cb=3Dc,r=abc", "pw");
        assert!(matches!(step, AuthStep::Success(_)), "{step:?}");
        assert_eq!(ex.identity().as_deref(), Some("a,b=c"));
        for bad in ["n,,n=a=2cb,r=abc", "n,,n=a=,r=abc", "n,,n=a=4"] {
            assert_eq!(m.start("c", None, Some(bad.as_bytes())).1, REFUSED, "{bad}");
        }
    }

    #[test]
    fn wrong_password_fails() {
        let m = method(&format!("alice:{}\n", hash_scram_sha256(b"wonderland", 4096)));
        let (ex, step, _) = exchange(&m, Some("alice"), "n,,", "n=alice,r=abc", "wonderlan");
        assert_eq!(step, AuthStep::Fail(0x86));
        assert_eq!(ex.identity(), None);
    }

    #[test]
    fn unknown_user_looks_real_then_fails() {
        let m = method(&format!("alice:{}\n", hash_scram_sha256(b"wonderland", 4096)));
        let shape = |s: &str| -> (usize, usize, String) {
            let f: Vec<&str> = s.split(',').collect();
            (f.len(), f[1].len(), f[2].to_owned())
        };
        let real = server_first(&m.start("c", None, Some(b"n,,n=alice,r=abc")).1);
        let (mut ex, step) = m.start("c", None, Some(b"n,,n=bob,r=abc"));
        let fake = server_first(&step);
        assert_eq!(shape(&real), shape(&fake), "{real} / {fake}");
        assert!(fake.starts_with("r=abc"));
        let again = server_first(&m.start("c", None, Some(b"n,,n=bob,r=abc")).1);
        assert_eq!(fake.split(',').nth(1), again.split(',').nth(1), "the same salt each time");
        let (final_msg, _) = client_final("wonderland", "n=bob,r=abc", &fake, "n,,");
        assert_eq!(ex.next(Some(final_msg.as_bytes())), REFUSED);
        assert_eq!(ex.identity(), None);

        // A user whose entry is not SCRAM is treated the same, and a missing file too.
        let m = method("carol:$6$Wz6TQq9bCNu130DL$1oXZ8YAVbRW0JIK2MaZ+41uFmz7eCfjWIRAt1WSLlwTW6Ik/5et1F1GwXfPBghbJP4if5w0NkIC70dbQSl7LgQ==");
        let (_, step, _) = exchange(&m, None, "n,,", "n=carol,r=abc", "hunter2");
        assert_eq!(step, REFUSED);
        let m = ScramSha256::new(Arc::new(ArcSwapOption::empty()));
        let (_, step, _) = exchange(&m, None, "n,,", "n=carol,r=abc", "hunter2");
        assert_eq!(step, REFUSED);
    }

    #[test]
    fn fake_iterations_follow_the_file() {
        let m = method(&format!("alice:{}\n", hash_scram_sha256(b"x", 8000)));
        let first = server_first(&m.start("c", None, Some(b"n,,n=bob,r=abc")).1);
        assert!(first.ends_with(",i=8000"), "{first}");
    }

    #[test]
    fn reads_the_file_current_at_start() {
        let files = passwords("");
        let m = ScramSha256::new(files.clone());
        let (mut ex, step) = m.start("c", None, Some(b"n,,n=alice,r=abc"));
        let fake = server_first(&step);
        files.store(Some(Arc::new(
            PasswordFile::parse(&format!("alice:{}", hash_scram_sha256(b"pw", 4096)), "t").unwrap(),
        )));
        let (final_msg, _) = client_final("pw", "n=alice,r=abc", &fake, "n,,");
        assert_eq!(ex.next(Some(final_msg.as_bytes())), REFUSED, "started before alice existed");
        let (_, step, _) = exchange(&m, None, "n,,", "n=alice,r=abc", "pw");
        assert!(matches!(step, AuthStep::Success(_)));
    }

    #[test]
    fn malformed_and_mismatched_messages_fail() {
        let m = method(&format!("alice:{}\n", hash_scram_sha256(b"pw", 4096)));
        let long = format!("n,,n=alice,r={}", "a".repeat(MAX_MESSAGE));
        for bad in [
            "",
            "p=tls-unique,,n=alice,r=abc",
            "x,,n=alice,r=abc",
            "n,a=bob,n=alice,r=abc",
            "n,,n=,r=abc",
            "n,,n=alice,r=",
            "n,,m=ext,n=alice,r=abc",
            "n,,r=abc,n=alice",
            "n,,n=alice",
            long.as_str(),
        ] {
            assert_eq!(m.start("c", None, Some(bad.as_bytes())).1, REFUSED, "{bad:?}");
        }
        assert_eq!(m.start("c", None, None).1, REFUSED);
        assert_eq!(m.start("c", None, Some(&[0xff, 0xfe])).1, REFUSED);
        assert_eq!(m.start("c", Some("bob"), Some(b"n,,n=alice,r=abc")).1, REFUSED, "CONNECT named another user");

        let bare = "n=alice,r=abc";
        let fresh = || {
            let (ex, step) = m.start("c", None, Some(format!("n,,{bare}").as_bytes()));
            let (good, _) = client_final("pw", bare, &server_first(&step), "n,,");
            (ex, good)
        };
        let tampers: [fn(&str) -> String; 5] = [
            |good| good.replacen("r=abc", "r=abcX", 1),
            |good| good.replace("c=biws", "c=eSws"),
            |good| format!("{good},x=1"),
            |good| good.replace(",p=", ",q="),
            |good| good.replace(",p=", ",p=AAAA"),
        ];
        for tamper in tampers {
            let (mut ex, good) = fresh();
            let bad = tamper(&good);
            assert_eq!(ex.next(Some(bad.as_bytes())), REFUSED, "{bad}");
            assert_eq!(ex.next(Some(good.as_bytes())), REFUSED, "an exchange ends at its first client-final");
        }
        let (mut ex, good) = fresh();
        assert!(matches!(ex.next(Some(good.as_bytes())), AuthStep::Success(_)), "untampered");
        assert_eq!(ex.next(Some(good.as_bytes())), REFUSED, "and only once");
    }

    #[test]
    fn nonce_mismatch_fails() {
        let m = method(&format!("alice:{}\n", hash_scram_sha256(b"pw", 4096)));
        let (mut ex, step) = m.start("c", None, Some(b"n,,n=alice,r=abc"));
        let first = server_first(&step);
        // A proof computed correctly, but over a nonce the server never sent.
        let forged = first.replacen("r=abc", "r=abcd", 1);
        let (final_msg, _) = client_final("pw", "n=alice,r=abc", &forged, "n,,");
        assert_eq!(ex.next(Some(final_msg.as_bytes())), REFUSED);
    }

    #[test]
    fn channel_binding_is_refused() {
        let m = method(&format!("alice:{}\n", hash_scram_sha256(b"pw", 4096)));
        let (mut ex, step) = m.start("c", None, Some(b"p=tls-server-end-point,,n=alice,r=abc"));
        assert_eq!(step, REFUSED);
        assert_eq!(ex.next(Some(b"c=biws,r=abc,p=AAAA")), REFUSED);
    }

    #[test]
    fn server_nonces_are_random() {
        let m = method(&format!("alice:{}\n", hash_scram_sha256(b"pw", 4096)));
        let a = server_first(&m.start("c", None, Some(b"n,,n=alice,r=abc")).1);
        let b = server_first(&m.start("c", None, Some(b"n,,n=alice,r=abc")).1);
        let nonce = |s: &str| s.split(',').next().unwrap().strip_prefix("r=abc").unwrap().to_owned();
        assert_ne!(nonce(&a), nonce(&b));
        assert!(nonce(&a).len() >= 24, "18 random bytes or more");
    }

    #[test]
    fn rfc7677_test_vector() {
        let salt = BASE64_STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let entry = ScramSecrets::derive(b"pencil", &salt, 4096).to_entry();
        let m = ScramSha256::with_server_nonce(passwords(&format!("user:{entry}")), "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
        let (mut ex, step) = m.start("c", Some("user"), Some(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"));
        assert_eq!(
            server_first(&step),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let step = ex.next(Some(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="));
        assert_eq!(
            step,
            AuthStep::Success(Some(Bytes::from_static(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")))
        );
        assert_eq!(ex.identity().as_deref(), Some("user"));
    }
}
