//! Image references: `[registry/]repository[:tag][@digest]`, with Docker's
//! defaults (`docker.io`, `library/`, `latest`).

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repo {
    /// Host and optional port, as written (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path (`library/busybox`).
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub repo: Repo,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {reference:?}: {problem}")]
pub struct ReferenceError {
    pub reference: String,
    pub problem: String,
}

impl Reference {
    /// What to ask the registry for: the digest if pinned, else the tag.
    pub fn target(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |p: &str| ReferenceError { reference: s.to_string(), problem: p.to_string() };
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(|e| err(&e.to_string()))?)),
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, path)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), path)
            }
            _ => ("docker.io".to_string(), rest),
        };
        let (name, tag) = match path.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (path, None),
        };
        if name.is_empty()
            || !name.split('/').all(|c| {
                !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            })
        {
            return Err(err("repository must be lowercase letters, digits, '.', '_', '-' and '/'"));
        }
        if let Some(t) = &tag {
            if t.is_empty() || t.len() > 128 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                return Err(err("bad tag"));
            }
        }
        let name =
            if registry == "docker.io" && !name.contains('/') { format!("library/{name}") } else { name.to_string() };
        let tag = if tag.is_none() && digest.is_none() { Some("latest".into()) } else { tag };
        Ok(Reference { repo: Repo { registry, name }, tag, digest })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.repo.registry, self.repo.name)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Repo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        let r: Reference = "busybox".parse().unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        let r: Reference = "127.0.0.1:5000/a/b:v1".parse().unwrap();
        assert_eq!(
            (r.repo.registry.as_str(), r.repo.name.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "a/b", Some("v1"))
        );
        let d = Digest::of(b"x");
        let r: Reference = format!("localhost/x@{d}").parse().unwrap();
        assert_eq!((r.tag, r.digest), (None, Some(d)));
        assert!("Upper/Case".parse::<Reference>().is_err());
        assert!("host:5000/x:bad tag".parse::<Reference>().is_err());
    }
}
