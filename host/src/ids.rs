//! Ids that carry the node that made them: `NODE.N` for sessions and for
//! the request ids instances see, `SPACE#NODE.N` for instances. One node
//! only ever needs its own; a cluster reads the node to know where an id
//! belongs (whose pending request a response answers).

use std::sync::Arc;

/// This node's name in ids: `server.node`, or random per start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId(Arc<str>);

/// `server.node`: empty (generated), or 1–32 of `a-z 0-9 -`.
pub fn validate_node(name: &str) -> Result<(), &'static str> {
    if name.len() > 32 {
        return Err("must be at most 32 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("may contain only a-z, 0-9 and '-'");
    }
    Ok(())
}

impl NodeId {
    /// The configured name, or 8 random hex digits when it is empty.
    pub fn resolve(configured: &str) -> Self {
        if !configured.is_empty() {
            return Self(configured.into());
        }
        let mut bytes = [0u8; 4];
        // Without OS randomness, the process id still tells nodes apart on a host.
        if getrandom::fill(&mut bytes).is_err() {
            bytes = std::process::id().to_be_bytes();
        }
        Self(
            bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into(),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `NODE.n`.
    pub fn scoped(&self, n: u64) -> String {
        format!("{}.{n}", self.0)
    }

    /// The `n` of an id this node made with [`scoped`](Self::scoped); `None`
    /// for another node's id or anything else.
    pub fn parse_scoped(&self, id: &str) -> Option<u64> {
        id.strip_prefix(&*self.0)?.strip_prefix('.')?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_node() {
        let a = NodeId::resolve("node-a");
        let id = a.scoped(42);
        assert_eq!(id, "node-a.42");
        assert_eq!(a.parse_scoped(&id), Some(42));
        assert_eq!(NodeId::resolve("node-b").parse_scoped(&id), None);
        assert_eq!(a.parse_scoped("42"), None);
        assert_eq!(a.parse_scoped("node-a.x"), None);
        let random = NodeId::resolve("");
        assert_eq!(random.as_str().len(), 8);
        assert!(validate_node(random.as_str()).is_ok());
        assert!(validate_node("Bad Name").is_err());
    }
}
