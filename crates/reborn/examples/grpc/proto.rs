//! The messages of `demo.Clock`, written as `prost` would generate them from:
//!
//! ```proto
//! syntax = "proto3";
//! package demo;
//! service Clock {
//!   rpc Who(WhoRequest) returns (Who);                  // which process answers
//!   rpc Ticks(TicksRequest) returns (stream Tick);      // a tick every `every_ms`
//! }
//! message WhoRequest {}
//! message Who { uint32 pid = 1; }
//! message TicksRequest { uint64 from = 1; uint64 every_ms = 2; }
//! message Tick { uint64 n = 1; uint32 pid = 2; }
//! ```
//!
//! Shared by the example server and its test's client.

/// `demo.Clock/Who`: the request.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct WhoRequest {}

/// `demo.Clock/Who`: the answer, the process that served the call.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Who {
    #[prost(uint32, tag = "1")]
    pub pid: u32,
}

/// `demo.Clock/Ticks`: where to start counting, and how often to tick.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct TicksRequest {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub every_ms: u64,
}

/// One tick of `demo.Clock/Ticks`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Tick {
    #[prost(uint64, tag = "1")]
    pub n: u64,
    #[prost(uint32, tag = "2")]
    pub pid: u32,
}

/// The path of `demo.Clock/Who`.
pub const WHO: &str = "/demo.Clock/Who";
/// The path of `demo.Clock/Ticks`.
pub const TICKS: &str = "/demo.Clock/Ticks";
