//! tern as one node of a cluster over NATS JetStream (issue 15).

pub mod owners;
