//! Smart routing: the task classifier, the routing policy, the quality validator and the
//! savings ledger. The server's side of it (running the plan, escalating to Claude) is in
//! `server::routed`.

pub mod checks;
pub mod classifier;
pub mod jsonl;
pub mod ledger;
pub mod policy;
pub mod validator;
