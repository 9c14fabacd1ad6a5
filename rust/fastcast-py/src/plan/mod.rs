//! Plans from Python: a `Plan` dict read into the core's plan ([`wire`]),
//! and the tables of a plain model's plan, laid out by the core without a
//! Python object per tensor ([`layout`]).

pub mod layout;
pub mod wire;
