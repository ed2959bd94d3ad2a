//! Admin tokens. A token is `ztp_<id>_<secret>`; the store keeps the id, a name and the
//! SHA-256 of the secret, never the secret. Verification looks the id up and compares
//! hashes in constant time.
//!
//! Each token has a [`Role`]. Records stored before roles existed carry none and decode
//! as `admin`: every token was one then.

use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

use super::commit::Plan;
use super::state::page_in;
use super::{json, now_ms, Actor, Kind, Op, Page, Store, StoreError};

/// What a token may do (DESIGN.md "REST conventions"). Ordered: each role may do what
/// the ones before it may.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads, audit, metrics.
    Viewer,
    /// Reads and writes of the configuration (services, users, groups, revoked,
    /// connectors, import); no tokens.
    Operator,
    /// Everything. The default: tokens made before roles existed were all admin.
    #[default]
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("{other:?} is not viewer, operator or admin")),
        }
    }
}

/// A token as listed: everything but the secret, which is not kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Absent in records made before roles existed: those are admin.
    #[serde(default)]
    pub role: Role,
    /// Hex SHA-256 of the secret.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    hash: String,
}

impl TokenInfo {
    /// The listing form (without the hash).
    pub fn public(&self) -> TokenInfo {
        TokenInfo {
            hash: String::new(),
            ..self.clone()
        }
    }
}

/// A token just created: the only time its secret is seen.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub info: TokenInfo,
    pub token: String,
}

fn random_hex(bytes: usize) -> Result<String, StoreError> {
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| StoreError::Unavailable("no system randomness".into()))?;
    Ok(hex(&buf))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash_secret(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// Equality that takes the same time wherever the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits `ztp_<id>_<secret>`.
fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("ztp_")?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && secret.len() == 64).then_some((id, secret))
}

impl Store {
    /// Creates an admin token named `name`.
    pub async fn create_token(&self, name: &str, actor: &Actor) -> Result<NewToken, StoreError> {
        self.create_token_with_role(name, Role::Admin, actor).await
    }

    /// Creates a token named `name` with `role`.
    pub async fn create_token_with_role(
        &self,
        name: &str,
        role: Role,
        actor: &Actor,
    ) -> Result<NewToken, StoreError> {
        let (mut new, mut info) = Self::mint_token(name)?;
        info.role = role;
        new.info.role = role;
        self.save_token(info, actor).await?;
        Ok(new)
    }

    /// A new token, not yet stored: the caller may put the secret somewhere safe first
    /// (the first-start admin token is written to its file before the store knows it).
    pub fn mint_token(name: &str) -> Result<(NewToken, TokenInfo), StoreError> {
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(StoreError::invalid(
                "name",
                "must be 1 to 128 printable characters",
            ));
        }
        let id = random_hex(8)?;
        let secret = random_hex(32)?;
        let info = TokenInfo {
            id: id.clone(),
            name: name.to_owned(),
            created_ms: now_ms(),
            role: Role::Admin,
            hash: hash_secret(&secret),
        };
        Ok((
            NewToken {
                info: info.public(),
                token: format!("ztp_{id}_{secret}"),
            },
            info,
        ))
    }

    /// Stores a minted token (its hash).
    pub async fn save_token(&self, info: TokenInfo, actor: &Actor) -> Result<(), StoreError> {
        self.write(None, actor, |_| Ok(token_plan(&info))).await?;
        Ok(())
    }

    /// Stores a minted token only if the store holds none yet: of several instances
    /// starting together on an empty store, exactly one stores its first token (and
    /// gets `true`).
    pub async fn save_first_token(
        &self,
        info: TokenInfo,
        actor: &Actor,
    ) -> Result<bool, StoreError> {
        let result = self
            .write(None, actor, |st| {
                if !st.tokens.is_empty() {
                    return Err(StoreError::Exists {
                        kind: "token",
                        name: "the first".into(),
                    });
                }
                Ok(token_plan(&info))
            })
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(StoreError::Exists { kind: "token", .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn list_tokens(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<TokenInfo>, StoreError> {
        let st = self.state();
        let mut page = page_in(&st.tokens, cursor, limit);
        page.items = page.items.iter().map(TokenInfo::public).collect();
        Ok(page)
    }

    pub fn token_count(&self) -> usize {
        self.state().tokens.len()
    }

    /// Revokes a token. The last admin token cannot be revoked: without one, no token
    /// could ever be made or revoked again (operators and viewers cannot manage tokens).
    pub async fn revoke_token(&self, id: &str, actor: &Actor) -> Result<(), StoreError> {
        self.write(None, actor, |st| {
            let Some(target) = st.tokens.get(id) else {
                return Err(StoreError::NotFound {
                    kind: "token",
                    name: id.into(),
                });
            };
            let admins = st.tokens.values().filter(|t| t.role == Role::Admin).count();
            if target.role == Role::Admin && admins <= 1 {
                return Err(StoreError::Conflict {
                    detail: "the last admin token cannot be revoked; create another first".into(),
                    errors: vec![],
                });
            }
            // Tokens are not configuration: no version bump, but audited.
            Ok(Plan {
                ops: vec![Op {
                    kind: Kind::Token,
                    key: id.to_owned(),
                    value: None,
                }],
                bump: false,
                action: "token.revoke".into(),
                target: id.to_owned(),
            })
        })
        .await?;
        Ok(())
    }

    /// The actor (with its role) a presented token belongs to, if it is valid.
    pub fn verify_token(&self, presented: &str) -> Option<Actor> {
        let (id, secret) = parse(presented)?;
        let info = self.state().tokens.get(id)?.clone();
        let presented = hash_secret(secret);
        constant_time_eq(presented.as_bytes(), info.hash.as_bytes()).then_some(Actor {
            token_id: info.id,
            token_name: info.name,
            role: info.role,
        })
    }
}

/// Stores a token: not configuration (no version bump), but audited.
fn token_plan(info: &TokenInfo) -> Plan {
    Plan {
        ops: vec![Op {
            kind: Kind::Token,
            key: info.id.clone(),
            value: Some(json(info)),
        }],
        bump: false,
        action: "token.create".into(),
        target: info.id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_format() {
        assert!(parse(&format!("ztp_{}_{}", "a".repeat(16), "b".repeat(64))).is_some());
        assert!(parse("ztp_short_secret").is_none());
        assert!(parse("Bearer x").is_none());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn records_without_a_role_are_admin() {
        // The shape stored before roles existed.
        let old =
            br#"{"id":"0123456789abcdef","name":"admin","created_ms":1763798400000,"hash":"00"}"#;
        let t: TokenInfo = serde_json::from_slice(old).unwrap();
        assert_eq!(t.role, Role::Admin);
        let new: TokenInfo = serde_json::from_str(
            r#"{"id":"0123456789abcdef","name":"v","created_ms":1,"role":"viewer","hash":"00"}"#,
        )
        .unwrap();
        assert_eq!(new.role, Role::Viewer);
        assert!(serde_json::from_str::<TokenInfo>(
            r#"{"id":"x","name":"v","created_ms":1,"role":"root"}"#
        )
        .is_err());
        assert_eq!("operator".parse::<Role>(), Ok(Role::Operator));
        assert!("root".parse::<Role>().is_err());
    }
}
