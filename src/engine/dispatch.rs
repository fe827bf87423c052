//! The bus's events, delivered to the flight of their key and to the L1.

use std::sync::Arc;

use crate::bus::{Event, EventKind, EventSink};
use crate::l1::L1;
use crate::metrics::Metrics;

use super::flight::FlightTable;
use super::generations::Generations;

pub(crate) struct Dispatcher {
    flights: Arc<FlightTable>,
    l1: L1,
    metrics: Metrics,
    /// Route generations, re-read from the store on a GENERATION event and after a resync.
    generations: Arc<Generations>,
}

impl Dispatcher {
    pub fn new(
        flights: Arc<FlightTable>,
        l1: L1,
        metrics: Metrics,
        generations: Arc<Generations>,
    ) -> Self {
        Self {
            flights,
            l1,
            metrics,
            generations,
        }
    }
}

impl EventSink for Dispatcher {
    fn deliver(&self, event: Event) {
        let kind = match &event.kind {
            EventKind::Ready { .. } => "ready",
            EventKind::Failed { .. } => "failed",
            EventKind::Uncacheable => "uncacheable",
            EventKind::Abandoned => "abandoned",
            EventKind::Deleted => "deleted",
            EventKind::Generation { .. } => "generation",
        };
        self.metrics.bus_events.with_label_values(&[kind]).inc();
        if let EventKind::Generation { .. } = event.kind {
            // A prompt to re-read the route's generation from the store, never a number to take:
            // anyone who can publish on the bus can send one.
            self.generations.heard(&event.key);
            return;
        }
        let deleted = event.kind == EventKind::Deleted;
        // Flights first, then the L1, as `Engine::delete` does.
        self.flights.post(&event.key, event.kind, event.lease);
        if deleted {
            self.l1.invalidate(&event.key);
        }
    }

    fn resync(&self) {
        self.metrics.bus_resyncs.inc();
        self.generations.resynced();
        for flight in self.flights.all() {
            flight.post_resync();
        }
    }

    fn undecodable(&self) {
        self.metrics
            .bus_events
            .with_label_values(&["undecodable"])
            .inc();
    }
}
