//! The stream between two simulated VMs: a tag byte, then the frame.
//!
//! Pages travel as (index, word) pairs, 12 bytes each on the socket for the
//! 4 KiB each stands for; the link's pace is the sender's to keep
//! (`max-bandwidth` counts the 4 KiB). The destination answers on the same
//! socket: [`Frame::Ack`] once everything landed, as QEMU's return path
//! does.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::guest::Guest;

const MAGIC: u32 = 0x4c4d_5356;
/// The stream's version: a receiver refuses any other.
pub const VERSION: u32 = 1;

/// What the source says first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Guest RAM, pages: both sides must have the same.
    pub pages: u64,
    /// The machine type: both sides must run the same.
    pub machine: String,
    /// The source set `tls-creds`: the destination must have too.
    pub tls: bool,
}

/// One frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// The stream's start.
    Hello(Hello),
    /// Pages and what they hold.
    Pages(Vec<(u32, u64)>),
    /// The guest itself (vCPU and device state).
    Device(Box<Guest>),
    /// The guest runs on the destination from now on; these pages (a
    /// bitmap's words) are still to come.
    Postcopy(Vec<u64>),
    /// Nothing more follows.
    End,
    /// Destination to source: everything landed.
    Ack,
}

/// A stream that is not ours, or broke.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed or closed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A frame we do not know.
    #[error("unknown section type {0}")]
    Tag(u8),
    /// Not a simulated VM's stream, or another version.
    #[error("not a migration stream of this version")]
    Magic,
    /// A frame's body does not parse.
    #[error("malformed frame: {0}")]
    Body(String),
}

/// Writes one frame (unbuffered: wrap the writer).
///
/// # Errors
/// The socket's error.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), WireError> {
    match frame {
        Frame::Hello(hello) => {
            w.write_u8(1).await?;
            w.write_u32_le(MAGIC).await?;
            w.write_u32_le(VERSION).await?;
            write_json(w, hello).await?;
        }
        Frame::Pages(pages) => {
            w.write_u8(2).await?;
            w.write_u32_le(pages.len() as u32).await?;
            let mut body = Vec::with_capacity(pages.len() * 12);
            for (page, value) in pages {
                body.extend_from_slice(&page.to_le_bytes());
                body.extend_from_slice(&value.to_le_bytes());
            }
            w.write_all(&body).await?;
        }
        Frame::Device(guest) => {
            w.write_u8(3).await?;
            write_json(w, guest.as_ref()).await?;
        }
        Frame::Postcopy(words) => {
            w.write_u8(4).await?;
            w.write_u32_le(words.len() as u32).await?;
            for word in words {
                w.write_u64_le(*word).await?;
            }
        }
        Frame::End => w.write_u8(5).await?,
        Frame::Ack => w.write_u8(0x81).await?,
    }
    Ok(())
}

/// Reads one frame.
///
/// # Errors
/// [`WireError`] when the stream breaks or is not ours.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, WireError> {
    let tag = r.read_u8().await?;
    Ok(match tag {
        1 => {
            if r.read_u32_le().await? != MAGIC || r.read_u32_le().await? != VERSION {
                return Err(WireError::Magic);
            }
            Frame::Hello(read_json(r).await?)
        }
        2 => {
            let count = r.read_u32_le().await? as usize;
            let mut body = vec![0u8; count * 12];
            r.read_exact(&mut body).await?;
            Frame::Pages(
                body.chunks_exact(12)
                    .map(|c| {
                        let page = u32::from_le_bytes(c[..4].try_into().expect("4 bytes"));
                        let value = u64::from_le_bytes(c[4..].try_into().expect("8 bytes"));
                        (page, value)
                    })
                    .collect(),
            )
        }
        3 => Frame::Device(Box::new(read_json(r).await?)),
        4 => {
            let count = r.read_u32_le().await? as usize;
            let mut words = Vec::with_capacity(count);
            for _ in 0..count {
                words.push(r.read_u64_le().await?);
            }
            Frame::Postcopy(words)
        }
        5 => Frame::End,
        0x81 => Frame::Ack,
        other => return Err(WireError::Tag(other)),
    })
}

async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> Result<(), WireError> {
    let body = serde_json::to_vec(value).map_err(|e| WireError::Body(e.to_string()))?;
    w.write_u32_le(body.len() as u32).await?;
    w.write_all(&body).await?;
    Ok(())
}

async fn read_json<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<T, WireError> {
    let len = r.read_u32_le().await? as usize;
    if len > 1 << 20 {
        return Err(WireError::Body(format!("{len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| WireError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::Workload;

    #[tokio::test]
    async fn every_frame_survives_the_trip() {
        let guest = Guest::boot(Workload::from_cmdline("wss=1 spin=0", 1024), 3);
        let frames = vec![
            Frame::Hello(Hello {
                pages: 1024,
                machine: "pc-i440fx-7.2".into(),
                tls: false,
            }),
            Frame::Pages(vec![(1, 2), (1023, u64::MAX)]),
            Frame::Device(Box::new(guest)),
            Frame::Postcopy(vec![0b101, 0]),
            Frame::End,
            Frame::Ack,
        ];
        let mut bytes = Vec::new();
        for f in &frames {
            write(&mut bytes, f).await.unwrap();
        }
        let mut reader = bytes.as_slice();
        for f in &frames {
            assert_eq!(&read(&mut reader).await.unwrap(), f);
        }
        assert!(read(&mut reader).await.is_err());
    }

    #[tokio::test]
    async fn a_stream_of_another_kind_is_refused() {
        let mut reader: &[u8] = &[1, 0, 0, 0, 0, 1, 0, 0, 0];
        assert!(matches!(read(&mut reader).await, Err(WireError::Magic)));
    }
}
