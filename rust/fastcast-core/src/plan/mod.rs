//! The plan of a conversion: its wire format ([`wire`], the one versioned
//! definition every plan is read as, whoever made it) and where each tensor
//! goes ([`layout`]: shards, offsets, and the whole plan of a model of plain
//! safetensors files).

pub mod layout;
pub mod wire;
