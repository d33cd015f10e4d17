//! Smart routing (in progress): the quality validator and the savings ledger. The task
//! classifier, the routing policy and the escalation path are still to come; see the routing
//! issue's notes.

pub mod ledger;
pub mod validator;
