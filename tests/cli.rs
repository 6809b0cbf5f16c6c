//! Black-box tests of the `orchestra` binary: what the README promises a user.
