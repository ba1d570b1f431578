//! Optional bearer tokens, checked in a tower layer before any service runs.
//!
//! With an admin token set, every `lmx.v1.ModelAdmin` call needs `authorization: Bearer <admin>`.
//! With an inference token set, every `lmx.v1.Inference` call needs the inference token or the
//! admin token. Health and reflection stay open (probes and grpcurl must work). A missing token
//! answers UNAUTHENTICATED, a wrong one PERMISSION_DENIED. Tokens are compared in constant time
//! (through their sha256, so not even their lengths leak) and never logged.

use std::sync::Arc;

use super::around::{Around, AroundLayer, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Code, Status};

use crate::{error::ApiError, secret::Secret};

/// The configured tokens.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    pub admin: Option<Secret>,
    pub inference: Option<Secret>,
}

struct Digests {
    admin: Option<[u8; 32]>,
    inference: Option<[u8; 32]>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Which token a call needs.
enum Guard {
    Open,
    Admin,
    Inference,
}

fn guard(path: &str) -> Guard {
    if path.starts_with("/lmx.v1.ModelAdmin/") {
        Guard::Admin
    } else if path.starts_with("/lmx.v1.Inference/") {
        Guard::Inference
    } else {
        Guard::Open
    }
}

impl Digests {
    /// None when the call may proceed, else the refusal.
    fn check(&self, path: &str, headers: &http::HeaderMap) -> Option<Status> {
        let accepted: Vec<&[u8; 32]> = match guard(path) {
            Guard::Open => return None,
            Guard::Admin => self.admin.iter().collect(),
            Guard::Inference => match &self.inference {
                None => return None,
                Some(inference) => [Some(inference), self.admin.as_ref()]
                    .into_iter()
                    .flatten()
                    .collect(),
            },
        };
        if accepted.is_empty() {
            return None;
        }
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| digest(t.trim()));
        let Some(presented) = presented else {
            return Some(
                ApiError::new(
                    Code::Unauthenticated,
                    "UNAUTHENTICATED",
                    "this call needs `authorization: Bearer <token>`",
                )
                .into(),
            );
        };
        let ok = accepted
            .iter()
            .fold(subtle::Choice::from(0), |acc, t| acc | t.ct_eq(&presented));
        if bool::from(ok) {
            None
        } else {
            Some(
                ApiError::new(
                    Code::PermissionDenied,
                    "PERMISSION_DENIED",
                    "the token is not valid for this call",
                )
                .into(),
            )
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Auth(Arc<Digests>);

impl Auth {
    pub fn layer(tokens: &Tokens) -> AroundLayer<Self> {
        AroundLayer(Self(Arc::new(Digests {
            admin: tokens.admin.as_ref().map(|t| digest(t.expose())),
            inference: tokens.inference.as_ref().map(|t| digest(t.expose())),
        })))
    }
}

impl Around for Auth {
    type State = ();

    fn before(&self, path: &str, headers: &http::HeaderMap) -> Result<(), Box<Status>> {
        match self.0.check(path, headers) {
            Some(refusal) => {
                tracing::warn!(method = %path, code = ?refusal.code(), "call refused");
                Err(Box::new(refusal))
            }
            None => Ok(()),
        }
    }

    fn after((): (), response: Response) -> Response {
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(t) = token {
            h.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        h
    }

    fn check(tokens: &Tokens, path: &str, token: Option<&str>) -> Option<Code> {
        let auth = Auth::layer(tokens).0;
        auth.0.check(path, &headers(token)).map(|s| s.code())
    }

    #[test]
    fn rules_per_service() {
        let both = Tokens {
            admin: Some(Secret::new("adm")),
            inference: Some(Secret::new("inf")),
        };
        let admin = "/lmx.v1.ModelAdmin/ListModels";
        let inference = "/lmx.v1.Inference/Generate";
        let health = "/grpc.health.v1.Health/Check";
        assert_eq!(check(&both, admin, None), Some(Code::Unauthenticated));
        assert_eq!(
            check(&both, admin, Some("inf")),
            Some(Code::PermissionDenied)
        );
        assert_eq!(check(&both, admin, Some("adm")), None);
        assert_eq!(check(&both, inference, None), Some(Code::Unauthenticated));
        assert_eq!(
            check(&both, inference, Some("nope")),
            Some(Code::PermissionDenied)
        );
        assert_eq!(check(&both, inference, Some("inf")), None);
        assert_eq!(
            check(&both, inference, Some("adm")),
            None,
            "the admin token also works"
        );
        assert_eq!(check(&both, health, None), None);
        assert_eq!(
            check(
                &both,
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                None
            ),
            None
        );

        let admin_only = Tokens {
            admin: Some(Secret::new("adm")),
            inference: None,
        };
        assert_eq!(
            check(&admin_only, inference, None),
            None,
            "inference open without its token"
        );
        assert_eq!(
            check(&Tokens::default(), admin, None),
            None,
            "no tokens, no checks"
        );
    }
}
