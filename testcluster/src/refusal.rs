//! Why the test API server refuses a request, as the `Status` a real one answers with. The pure
//! parts (selectors, patches, apply, body decoding) say which refusal; the router writes it.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 400 BadRequest: a body, a selector or a parameter that cannot be read.
    BadRequest(String),
    /// 422 Invalid: a JSON patch that cannot be applied to the object.
    Invalid(String),
    /// 409 Conflict: a server-side apply over fields another manager owns, without force.
    Conflict(String),
}

impl Refusal {
    pub fn code(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::Invalid(_) => 422,
            Refusal::Conflict(_) => 409,
        }
    }

    /// The Status `reason` (metav1.StatusReason).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "BadRequest",
            Refusal::Invalid(_) => "Invalid",
            Refusal::Conflict(_) => "Conflict",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Refusal::BadRequest(m) | Refusal::Invalid(m) | Refusal::Conflict(m) => m,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.reason(), self.code(), self.message())
    }
}

impl std::error::Error for Refusal {}
