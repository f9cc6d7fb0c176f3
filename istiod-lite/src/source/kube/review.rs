//! TokenReview: asking the API server who a workload's token belongs to.

use http::Method;
use serde_json::{Value, json};

use super::{KubeClient, KubeError};

/// The API server's verdict on a token (a TokenReview's status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReviewedToken {
    pub authenticated: bool,
    /// `system:serviceaccount:<namespace>:<name>` for a service account token.
    pub username: String,
    /// The audiences the token is valid for, of those asked about.
    pub audiences: Vec<String>,
    /// Present for a pod-bound token.
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub node_name: Option<String>,
    /// Why the token was not authenticated, when the server says.
    pub error: Option<String>,
}

impl KubeClient {
    /// Asks the API server who `token` belongs to (POST a TokenReview). `audiences`, when not
    /// empty, are the audiences the token must have been issued for.
    pub async fn token_review(
        &self,
        token: &str,
        audiences: &[String],
    ) -> Result<ReviewedToken, KubeError> {
        let path = "/apis/authentication.k8s.io/v1/tokenreviews";
        let mut spec = json!({ "token": token });
        if !audiences.is_empty() {
            spec["audiences"] = json!(audiences);
        }
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": spec,
        });
        let v = self
            .request_json(Method::POST, path, Some(("application/json", body)))
            .await?;
        ReviewedToken::from_status(v.get("status").unwrap_or(&Value::Null)).ok_or_else(|| {
            KubeError::Decode {
                path: path.into(),
                reason: "status.authenticated is not a boolean".into(),
            }
        })
    }
}

impl ReviewedToken {
    /// The namespace and name of the service account the token belongs to, if it was
    /// authenticated and is a service account token.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        if !self.authenticated {
            return None;
        }
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        let (ns, sa) = rest.split_once(':')?;
        (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then_some((ns, sa))
    }

    fn from_status(status: &Value) -> Option<Self> {
        let user = status.get("user").unwrap_or(&Value::Null);
        let extra = |name: &str| {
            user.get("extra")?
                .get(format!("authentication.kubernetes.io/{name}"))?
                .as_array()?
                .first()?
                .as_str()
                .map(str::to_owned)
        };
        let strings = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Some(Self {
            authenticated: status
                .get("authenticated")
                .map_or(Some(false), Value::as_bool)?,
            username: user
                .get("username")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            audiences: strings(status.get("audiences")),
            pod_name: extra("pod-name"),
            pod_uid: extra("pod-uid"),
            node_name: extra("node-name"),
            error: status
                .get("error")
                .and_then(Value::as_str)
                .filter(|e| !e.is_empty())
                .map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_from_username() {
        let t = |authenticated, username: &str| ReviewedToken {
            authenticated,
            username: username.into(),
            ..Default::default()
        };
        assert_eq!(
            t(true, "system:serviceaccount:apps:web").service_account(),
            Some(("apps", "web"))
        );
        assert_eq!(
            t(false, "system:serviceaccount:apps:web").service_account(),
            None
        );
        assert_eq!(
            t(true, "system:serviceaccount:apps").service_account(),
            None
        );
        assert_eq!(
            t(true, "system:serviceaccount:a:b:c").service_account(),
            None
        );
        assert_eq!(t(true, "alice").service_account(), None);
    }
}
