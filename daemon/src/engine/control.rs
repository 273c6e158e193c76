//! The control side of the engine: requests to the registry link. The node asks for a key
//! or an endpoint once until it is answered, so a request the link's channel had no room for
//! must not be lost: it waits here, in order, and goes as soon as the channel has room (the
//! engine waits for room only while something waits).

use std::collections::VecDeque;

use tokio::sync::mpsc;

use crate::registry_link::LinkCmd;

/// The engine's end of the link, with the requests not yet handed over.
#[derive(Debug)]
pub(super) struct Control {
    link: mpsc::Sender<LinkCmd>,
    unsent: VecDeque<LinkCmd>,
}

impl Control {
    pub(super) fn new(link: mpsc::Sender<LinkCmd>) -> Self {
        Control {
            link,
            unsent: VecDeque::new(),
        }
    }

    /// Hands `cmd` to the link now if it has room and nothing waits before it; otherwise it
    /// waits its turn.
    pub(super) fn request(&mut self, cmd: LinkCmd) {
        if !self.unsent.is_empty() {
            self.unsent.push_back(cmd);
            return;
        }
        match self.link.try_send(cmd) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(cmd)) => self.unsent.push_back(cmd),
            // The link is gone (shutting down): nothing will answer.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Whether requests wait for room.
    pub(super) fn has_unsent(&self) -> bool {
        !self.unsent.is_empty()
    }

    /// Waits for room in the link's channel (`None`: the link is gone). The future holds
    /// its own sender, so the engine can hand the room back to `on_room`.
    pub(super) fn room(
        &self,
    ) -> impl std::future::Future<Output = Option<mpsc::OwnedPermit<LinkCmd>>> + 'static {
        let link = self.link.clone();
        async move { link.reserve_owned().await.ok() }
    }

    /// Hands waiting requests over, the first through `permit`, the rest while there is room.
    pub(super) fn on_room(&mut self, permit: Option<mpsc::OwnedPermit<LinkCmd>>) {
        let Some(permit) = permit else {
            self.unsent.clear();
            return;
        };
        if let Some(cmd) = self.unsent.pop_front() {
            permit.send(cmd);
        }
        self.retry();
    }

    /// Hands over what waits while the channel has room.
    pub(super) fn retry(&mut self) {
        while let Some(cmd) = self.unsent.pop_front() {
            match self.link.try_send(cmd) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(cmd)) => {
                    self.unsent.push_front(cmd);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.unsent.clear();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a failed test
    use super::*;

    fn node_of(c: LinkCmd) -> u32 {
        match c {
            LinkCmd::Lookup(n) | LinkCmd::Resolve(n) => n,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_request_the_full_link_refused_goes_once_it_has_room() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut c = Control::new(tx);
        c.request(LinkCmd::Lookup(1));
        // The channel is full: these wait instead of being lost.
        c.request(LinkCmd::Resolve(2));
        c.request(LinkCmd::Lookup(3));
        assert!(c.has_unsent());
        assert_eq!(node_of(rx.recv().await.unwrap()), 1);
        // Room again: the engine's wait for room completes and hands them over in order.
        let permit = c.room().await;
        c.on_room(permit);
        assert_eq!(node_of(rx.recv().await.unwrap()), 2);
        assert!(c.has_unsent(), "one slot: the third still waits");
        let permit = c.room().await;
        c.on_room(permit);
        assert_eq!(node_of(rx.recv().await.unwrap()), 3);
        assert!(!c.has_unsent());
        // A later request goes straight through.
        c.request(LinkCmd::Lookup(4));
        assert_eq!(node_of(rx.recv().await.unwrap()), 4);
    }
}
