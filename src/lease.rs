//! A lease's two names: the owner's secret [`Token`], which alone writes under the lease, and its
//! public [`LeaseId`], which the store tells followers and the lease-ending events carry. Below
//! both the store and the bus, which each speak of leases.

/// A lease owner's identity: 128 random bits, fresh for every flight.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Token(pub u128);

impl Token {
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// 32 lowercase hex digits, as stored.
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }

    /// The public name of the lease this token holds.
    pub fn lease_id(self) -> LeaseId {
        LeaseId::of(self)
    }
}

/// A lease's public name: the first 16 bytes of the BLAKE3 hash of its owner token.
///
/// The store tells it to followers with WAIT, and the events that end the lease carry it, so a
/// follower can tell the event that ends the lease it waits on from one that anybody with access to
/// the bus could publish. It reveals nothing of the token, which alone writes under the lease.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct LeaseId(pub [u8; 16]);

impl LeaseId {
    pub fn of(token: Token) -> Self {
        let hash = blake3::hash(token.to_hex().as_bytes());
        Self(hash.as_bytes()[..16].try_into().expect("16 of 32 bytes"))
    }

    /// 32 lowercase hex digits, as a store keeps it beside the lease.
    pub fn to_hex(self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    pub fn from_hex(hex: &[u8]) -> Option<Self> {
        if hex.len() != 32 {
            return None;
        }
        let mut out = [0; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let pair = std::str::from_utf8(pair).ok()?;
            out[i] = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(Self(out))
    }
}
