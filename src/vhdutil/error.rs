//! vhd-util's error: what failed and why. A command returns [`Result`]; the exit status
//! (blktap's `|errno|`) is derived from it only in [`super::main`], and the `-errno` numbers
//! some of blktap's messages print come from [`Error::neg`].

use nix::errno::Errno;

use crate::image::crypto::CryptoError;
use crate::image::ImageError;

/// Why a vhd-util command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command's usage text was printed: bad or missing options (EINVAL).
    #[error("invalid usage")]
    Usage,
    /// An argument, or the state of an image, that the command refuses (EINVAL).
    #[error("{0}")]
    Invalid(String),
    /// The image layer failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A key operation failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A file operation outside the image layer failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A condition blktap reports by this errno (ENOKEY, EEXIST, EIO of a short read...),
    /// with what it is about.
    #[error("{context}: {errno}")]
    Os { context: String, errno: Errno },
}

/// A command's outcome.
pub type Result<T = ()> = std::result::Result<T, Error>;

impl Error {
    /// A refused argument or image state.
    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::Invalid(msg.into())
    }

    /// A failed file operation.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A condition reported by `errno`.
    pub fn os(context: impl Into<String>, errno: Errno) -> Error {
        Error::Os {
            context: context.into(),
            errno,
        }
    }

    /// The positive errno: the exit status, as blktap's vhd-util returns it.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Usage | Error::Invalid(_) => libc::EINVAL,
            Error::Image(e) => e.errno(),
            Error::Crypto(e) => e.errno(),
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Os { errno, .. } => *errno as i32,
        }
    }

    /// `-errno`, as blktap's messages print it (`error opening x.vhd: -2`).
    pub fn neg(&self) -> i32 {
        -self.errno()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_follows_the_cause() {
        assert_eq!(Error::Usage.errno(), libc::EINVAL);
        assert_eq!(Error::invalid("x").errno(), libc::EINVAL);
        let e = Error::io(
            "open a.vhd",
            std::io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(e.neg(), -libc::ENOENT);
        assert_eq!(
            e.to_string(),
            "open a.vhd: No such file or directory (os error 2)"
        );
        assert_eq!(Error::os("key", Errno::ENOKEY).errno(), libc::ENOKEY);
        assert_eq!(
            Error::from(ImageError::NoSpace("full".into())).errno(),
            libc::ENOSPC
        );
    }
}
