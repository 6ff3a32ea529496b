//! Where the parts of a multipart upload are written.

use std::collections::HashSet;
use std::path::PathBuf;

/// A part that cannot be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DestinationError {
    #[error("a file part needs a filename or the 'path' query parameter")]
    Unnamed,
    #[error("two parts resolve to the same path '{}'", .0.display())]
    Duplicate(PathBuf),
}

/// The destinations of one upload's file parts: the `path` query parameter when
/// given (one part), else each part's filename, resolved by the caller's rule
/// (`~`, relative to the working directory, normalised). No two parts may land on
/// the same file.
#[derive(Debug)]
pub struct Destinations<'a> {
    query_path: Option<&'a str>,
    seen: HashSet<PathBuf>,
}

impl<'a> Destinations<'a> {
    pub fn new(query_path: Option<&'a str>) -> Self {
        Destinations {
            query_path: query_path.filter(|p| !p.is_empty()),
            seen: HashSet::new(),
        }
    }

    /// The destination of the next file part, named `file_name` by the client.
    pub fn next(
        &mut self,
        file_name: Option<&str>,
        resolve: impl FnOnce(&str) -> PathBuf,
    ) -> Result<PathBuf, DestinationError> {
        let dest = match (self.query_path, file_name) {
            (Some(p), _) => p,
            (None, Some(f)) if !f.is_empty() => f,
            _ => return Err(DestinationError::Unnamed),
        };
        let path = resolve(dest);
        if !self.seen.insert(path.clone()) {
            return Err(DestinationError::Duplicate(path));
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::users::resolve;
    use std::path::Path;

    fn res(p: &str) -> PathBuf {
        resolve(p, Path::new("/home/user"), Path::new("/work"))
    }

    #[test]
    fn filenames_resolve_and_may_not_collide() {
        let mut d = Destinations::new(None);
        assert_eq!(d.next(Some("a.txt"), res), Ok(PathBuf::from("/work/a.txt")));
        assert_eq!(d.next(Some("~/b"), res), Ok(PathBuf::from("/home/user/b")));
        assert_eq!(
            d.next(Some("./x/../a.txt"), res),
            Err(DestinationError::Duplicate(PathBuf::from("/work/a.txt")))
        );
        assert_eq!(d.next(Some(""), res), Err(DestinationError::Unnamed));
        assert_eq!(d.next(None, res), Err(DestinationError::Unnamed));
    }

    #[test]
    fn the_query_path_wins_and_names_one_part() {
        let mut d = Destinations::new(Some("/tmp/up"));
        assert_eq!(d.next(Some("ignored"), res), Ok(PathBuf::from("/tmp/up")));
        assert!(matches!(
            d.next(None, res),
            Err(DestinationError::Duplicate(_))
        ));
        let mut empty = Destinations::new(Some(""));
        assert_eq!(empty.next(None, res), Err(DestinationError::Unnamed));
    }
}
