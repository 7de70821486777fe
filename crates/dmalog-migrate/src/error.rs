//! Why a migration failed, on either side: the stream, the device, the peer, guest memory.

use dmalog::TrackerError;

use crate::stream::StreamError;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The stream failed (connection lost, corrupt frame).
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The device failed.
    #[error("device: {0}")]
    Device(TrackerError),
    /// The connection to the device (its server) failed: the device is gone.
    #[error("lost the connection to the device server ({0}); the migration cannot go on")]
    DeviceLost(std::io::Error),
    /// The device server stopped answering (its socket timed out): as good as gone.
    #[error("the device server did not answer in time ({0}); the migration cannot go on")]
    DeviceSilent(std::io::Error),
    /// The other side gave up or answered out of turn.
    #[error("peer: {0}")]
    Peer(String),
    /// The destination was told to resume the guest and did not confirm it: the guest may
    /// run there, so the source VM stays paused (the guest never runs on both hosts).
    #[error("the destination was told to resume the guest and did not confirm it ({0}); the VM stays paused here: the guest may be running at the destination")]
    Unconfirmed(Box<MigrateError>),

    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(&'static str),
    /// The device offers no STOP_COPY (its MIGRATION flags): its state cannot be saved.
    #[error("the device cannot migrate: its MIGRATION flags {0:#x} lack STOP_COPY")]
    NotMigratable(u64),
}

impl MigrateError {
    /// This error as [`StreamError::PeerClosed`] by `peer` when it is the connection
    /// ending (the end of the stream, a reset, a broken pipe); otherwise unchanged.
    pub fn closed_by(self, peer: &'static str) -> Self {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        match self {
            MigrateError::Stream(StreamError::Io(io))
                if matches!(
                    io.kind(),
                    UnexpectedEof | BrokenPipe | ConnectionReset | ConnectionAborted
                ) =>
            {
                MigrateError::Stream(StreamError::PeerClosed { peer, io })
            }
            other => other,
        }
    }
}

impl From<TrackerError> for MigrateError {
    fn from(err: TrackerError) -> Self {
        match err {
            TrackerError::Transport(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                MigrateError::DeviceSilent(io)
            }
            TrackerError::Transport(io) => MigrateError::DeviceLost(io),
            other => MigrateError::Device(other),
        }
    }
}

impl From<std::io::Error> for MigrateError {
    fn from(err: std::io::Error) -> Self {
        MigrateError::Stream(StreamError::Io(err))
    }
}
