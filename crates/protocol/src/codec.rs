//! One JSON message per line, with a size limit.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// The longest message accepted (a definition or a job record is a few KiB).
pub const MAX_MESSAGE: usize = 4 << 20;

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The connection failed.
    #[error("connection error")]
    Io(#[from] std::io::Error),
    /// A line longer than [`MAX_MESSAGE`].
    #[error("message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    /// A line that is not the expected JSON.
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
}

/// Reads one message; `None` at a clean end of stream.
///
/// # Errors
/// [`CodecError`] for I/O errors, oversized lines or undecodable JSON.
pub async fn read_message<R, T>(reader: &mut R) -> Result<Option<T>, CodecError>
where
    R: AsyncBufRead + Unpin,
    T: DeserializeOwned,
{
    let mut line = Vec::new();
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(CodecError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                line.extend_from_slice(&chunk[..end]);
                reader.consume(end + 1);
                break;
            }
            None => {
                let n = chunk.len();
                line.extend_from_slice(chunk);
                reader.consume(n);
            }
        }
        if line.len() > MAX_MESSAGE {
            return Err(CodecError::TooLong);
        }
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(CodecError::Malformed)
}

/// Writes one message and flushes.
///
/// # Errors
/// I/O errors.
pub async fn write_message<W, T>(writer: &mut W, message: &T) -> Result<(), CodecError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut line = serde_json::to_vec(message).map_err(CodecError::Malformed)?;
    line.push(b'\n');
    writer.write_all(&line).await?;
    writer.flush().await?;
    Ok(())
}
