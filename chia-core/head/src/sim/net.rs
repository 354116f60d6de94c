//! Virtual time and the event queue, and the ordering rule of the simulated network: on each
//! connection, each direction delivers in the order sent (a QUIC stream), while deliveries on
//! different connections interleave as their random delays fall.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Virtual time, in microseconds since the run began.
pub(crate) type Micros = u64;

struct Entry<E> {
    at: Micros,
    /// Breaks ties between events due at the same moment: first scheduled, first run. It is
    /// also what keeps one direction of a connection in order when two deliveries fall due at
    /// once.
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Entry<E> {
    /// Reversed: the heap's greatest is the earliest event.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Events by due time, O(log n) per push and pop however many are pending.
pub(crate) struct Queue<E> {
    heap: BinaryHeap<Entry<E>>,
    next_seq: u64,
}

impl<E> Queue<E> {
    pub(crate) fn new() -> Queue<E> {
        Queue { heap: BinaryHeap::new(), next_seq: 0 }
    }

    pub(crate) fn push(&mut self, at: Micros, event: E) {
        self.next_seq += 1;
        self.heap.push(Entry { at, seq: self.next_seq, event });
    }

    pub(crate) fn peek_time(&self) -> Option<Micros> {
        self.heap.peek().map(|e| e.at)
    }

    pub(crate) fn pop(&mut self) -> Option<(Micros, E)> {
        self.heap.pop().map(|e| (e.at, e.event))
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

/// One direction of a connection: a delivery never overtakes an earlier one.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Lane {
    last_delivery: Micros,
}

impl Lane {
    /// When a message sent now with this delay arrives: not before what was sent earlier.
    pub(crate) fn arrival(&mut self, now: Micros, delay: Micros) -> Micros {
        let at = (now + delay).max(self.last_delivery);
        self.last_delivery = at;
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_ties_in_push_order() {
        let mut q = Queue::new();
        q.push(5, "b");
        q.push(3, "a");
        q.push(5, "c");
        assert_eq!(q.pop(), Some((3, "a")));
        assert_eq!(q.pop(), Some((5, "b")));
        assert_eq!(q.pop(), Some((5, "c")));
        let mut lane = Lane::default();
        assert_eq!(lane.arrival(0, 10), 10);
        assert_eq!(lane.arrival(1, 2), 10, "a later message never overtakes");
    }
}
