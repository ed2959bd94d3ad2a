//! Router tests: written next.
