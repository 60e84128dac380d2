//! The source's post-copy: the guest stops here and runs on the
//! destination from now on; the pages it left follow at
//! `max-postcopy-bandwidth`. A stream that breaks leaves both sides
//! `postcopy-paused`: the source never runs the guest again.

use tokio::sync::mpsc;

use super::outgoing::{set_status, Job, Outcome, Reader, Writer, ACK_TIMEOUT};
use super::passes::{bandwidth, page_words, take_pages, Phase, WINDOW};
use super::wire::{self, Frame};
use super::Control;
use crate::machine::{lock, RunState};
use crate::ram::{PageSet, PAGE_SIZE};
use qmp::commands::migration::MigrationStatus;

impl Job {
    pub(super) async fn postcopy(
        &mut self,
        mut reader: Reader,
        mut writer: Writer,
        mut to_send: PageSet,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Outcome {
        let (words, guest) = {
            let mut m = lock(&self.shared);
            set_status(&mut m, MigrationStatus::PostcopyActive);
            self.stopped_running = m.run_state == RunState::Running;
            m.stop(RunState::FinishMigrate);
            if let Some(log) = m.ram.dirty_log.take() {
                to_send.union_with(&log);
            }
            (page_words(&to_send), m.guest.clone())
        };
        // From here on the destination runs the guest: the source never does
        // again, whatever happens to the stream.
        self.stopped_running = false;
        let mut frames = vec![Frame::Postcopy(words)];
        frames.extend(guest.map(|g| Frame::Device(Box::new(g))));
        for frame in &frames {
            if wire::write(&mut writer, frame).await.is_err() {
                return Outcome::PostcopyPaused;
            }
        }
        let mut scan = 0;
        let mut window = tokio::time::interval(WINDOW);
        while !to_send.is_empty() {
            tokio::select! {
                _ = window.tick() => {}
                order = control.recv() => if order.is_none() { return Outcome::PostcopyPaused },
            }
            let batch = {
                let mut m = lock(&self.shared);
                let budget = bandwidth(&m, "max-postcopy-bandwidth") / 10;
                let batch = take_pages(&mut m, &mut to_send, &mut scan, budget, Phase::Postcopy);
                m.migration.ram.remaining = to_send.count() as u64 * PAGE_SIZE;
                batch
            };
            if wire::write(&mut writer, &Frame::Pages(batch))
                .await
                .is_err()
            {
                return Outcome::PostcopyPaused;
            }
        }
        if wire::write(&mut writer, &Frame::End).await.is_err()
            || tokio::io::AsyncWriteExt::flush(&mut writer).await.is_err()
        {
            return Outcome::PostcopyPaused;
        }
        match tokio::time::timeout(ACK_TIMEOUT, wire::read(&mut reader)).await {
            Ok(Ok(Frame::Ack)) => {
                lock(&self.shared).migration.downtime_ms = Some(0);
                Outcome::Completed
            }
            _ => Outcome::PostcopyPaused,
        }
    }
}
