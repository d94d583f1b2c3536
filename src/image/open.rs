//! One entry point to open any image: probe or name the format, then open it (with its
//! chain for VHD).

use std::path::Path;

use super::chain::{open_vhd_chain, OpenOptions};
use super::file::{BlockFile, OsFile};
use super::raw::RawImage;
use super::vhd::engine::find_footer;
use super::{Image, ImageError};

/// Image formats (tapdisk's `aio` is raw).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Vhd,
}

impl ImageFormat {
    /// Parse a tapdisk driver name (`aio`, `raw`, `vhd`). blktap's `sync` driver (raw
    /// with synchronous I/O) is not one of ours: tapdisk refuses it with ENOSYS, so it
    /// gives `None` here too.
    pub fn from_driver(name: &str) -> Option<ImageFormat> {
        match name {
            "aio" | "raw" => Some(ImageFormat::Raw),
            "vhd" => Some(ImageFormat::Vhd),
            _ => None,
        }
    }

    /// blktap's driver name (stats JSON `driver.name`): `aio` for raw.
    pub fn driver_name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "aio",
            ImageFormat::Vhd => "vhd",
        }
    }

    /// blktap's driver number (stats JSON `driver.type`): `DISK_TYPE_AIO` 0, `DISK_TYPE_VHD` 4.
    pub fn driver_type(self) -> u32 {
        match self {
            ImageFormat::Raw => 0,
            ImageFormat::Vhd => 4,
        }
    }
}

/// Guess the format of `path`: a valid VHD footer (primary, short or backup) means VHD.
pub fn probe(path: &Path) -> Result<ImageFormat, ImageError> {
    let f = OsFile::open(path, false).map_err(|e| ImageError::io(path, "open", e))?;
    Ok(if find_footer(path, &f as &dyn BlockFile, false).is_ok() {
        ImageFormat::Vhd
    } else {
        ImageFormat::Raw
    })
}

/// Open `path` as `format` (VHD with its whole parent chain and keys).
pub fn open(
    path: &Path,
    format: ImageFormat,
    opts: &OpenOptions,
) -> Result<Box<dyn Image>, ImageError> {
    Ok(match format {
        ImageFormat::Raw => Box::new(RawImage::open_with(path, opts.read_only, opts.direct)?),
        ImageFormat::Vhd => Box::new(open_vhd_chain(path, opts)?),
    })
}

#[cfg(test)]
mod tests {
    use super::ImageFormat;

    #[test]
    fn driver_names() {
        for (name, want) in [
            ("aio", Some(ImageFormat::Raw)),
            ("raw", Some(ImageFormat::Raw)),
            ("vhd", Some(ImageFormat::Vhd)),
            ("sync", None),
            ("vhdsync", None),
            ("", None),
        ] {
            assert_eq!(ImageFormat::from_driver(name), want, "{name}");
        }
    }
}
