//! The stream between a mirror and the NBD export it writes to: a tag
//! byte, then the frame. Not NBD itself: both ends are simulated VMs, and
//! what the agent sees of the copy is QMP, not this stream.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAGIC: u32 = 0x4c4d_4e42;
/// The stream's version: a server refuses any other.
pub const VERSION: u32 = 1;
/// The largest write one frame carries.
pub const MAX_WRITE: usize = 4 << 20;

/// What the client says first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The export to open.
    pub export: String,
    /// The client was given TLS credentials.
    pub tls: bool,
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client: the connection's start.
    Hello(Hello),
    /// Server: the export is open (its size), or why not.
    Opened(Result<u64, String>),
    /// Client: these bytes at this offset.
    Write {
        /// Where, in the disk.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// Client: this many bytes at this offset, whose content the
    /// simulation does not carry (an image format it does not read).
    Skip {
        /// Where, in the disk.
        offset: u64,
        /// How many.
        len: u64,
    },
    /// Server: the last write landed.
    Ack,
}

/// A stream that is not ours, or broke.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed or closed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A frame we do not know.
    #[error("unknown NBD frame {0}")]
    Tag(u8),
    /// Not a simulated VM's stream, or another version.
    #[error("not an NBD stream of this version")]
    Magic,
    /// A frame's body does not parse or is too large.
    #[error("malformed frame: {0}")]
    Body(String),
}

/// Writes one frame.
///
/// # Errors
/// The socket's error.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), WireError> {
    let mut buf = Vec::new();
    match frame {
        Frame::Hello(hello) => {
            buf.push(1);
            buf.extend_from_slice(&MAGIC.to_le_bytes());
            buf.extend_from_slice(&VERSION.to_le_bytes());
            json(&mut buf, hello)?;
        }
        Frame::Opened(result) => {
            buf.push(2);
            json(&mut buf, result)?;
        }
        Frame::Write { offset, data } => {
            buf.push(3);
            buf.extend_from_slice(&offset.to_le_bytes());
            buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
            buf.extend_from_slice(data);
        }
        Frame::Skip { offset, len } => {
            buf.push(4);
            buf.extend_from_slice(&offset.to_le_bytes());
            buf.extend_from_slice(&len.to_le_bytes());
        }
        Frame::Ack => buf.push(0x81),
    }
    w.write_all(&buf).await?;
    w.flush().await?;
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
        2 => Frame::Opened(read_json(r).await?),
        3 => {
            let offset = r.read_u64_le().await?;
            let len = r.read_u32_le().await? as usize;
            if len > MAX_WRITE {
                return Err(WireError::Body(format!("a write of {len} bytes")));
            }
            let mut data = vec![0u8; len];
            r.read_exact(&mut data).await?;
            Frame::Write { offset, data }
        }
        4 => Frame::Skip {
            offset: r.read_u64_le().await?,
            len: r.read_u64_le().await?,
        },
        0x81 => Frame::Ack,
        other => return Err(WireError::Tag(other)),
    })
}

fn json<T: Serialize>(buf: &mut Vec<u8>, value: &T) -> Result<(), WireError> {
    let body = serde_json::to_vec(value).map_err(|e| WireError::Body(e.to_string()))?;
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    Ok(())
}

async fn read_json<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<T, WireError> {
    let len = r.read_u32_le().await? as usize;
    if len > 1 << 16 {
        return Err(WireError::Body(format!("{len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| WireError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_frame_survives_the_trip() {
        let frames = vec![
            Frame::Hello(Hello {
                export: "livemig-vda".into(),
                tls: true,
            }),
            Frame::Opened(Ok(1 << 30)),
            Frame::Opened(Err("Requested export not available".into())),
            Frame::Write {
                offset: 4096,
                data: vec![1, 2, 3],
            },
            Frame::Skip {
                offset: 1 << 20,
                len: 1 << 20,
            },
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
    async fn a_stream_of_another_kind_or_an_oversized_write_is_refused() {
        let mut reader: &[u8] = &[1, 0, 0, 0, 0, 1, 0, 0, 0];
        assert!(matches!(read(&mut reader).await, Err(WireError::Magic)));
        let mut huge = vec![3];
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&(u32::MAX).to_le_bytes());
        assert!(matches!(
            read(&mut huge.as_slice()).await,
            Err(WireError::Body(_))
        ));
    }
}
