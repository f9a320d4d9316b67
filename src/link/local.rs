//! An in-process client (written next).
