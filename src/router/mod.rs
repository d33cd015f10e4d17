//! Smart routing (in progress): the task classifier, the quality validator and the savings
//! ledger. The routing policy and the escalation path are still to come; see the routing issue's
//! notes.

pub mod classifier;
pub mod ledger;
pub mod validator;
