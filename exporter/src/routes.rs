//! The HTTP paths that more than one layer must know: routing serves them, the web layer
//! treats them apart. A leaf module: it imports nothing from the crate.

/// The Alertmanager webhook path, on whichever listener serves it. Basic auth of the web
/// configuration exempts it: the webhook has its own credentials.
pub const WEBHOOK_PATH: &str = "/hooks/alertmanager";
