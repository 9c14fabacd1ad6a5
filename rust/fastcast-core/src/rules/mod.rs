//! The rules of a conversion, one per file: which names `--keep` keeps
//! ([`glob`]), what dtype each tensor gets ([`target`]), which tensors hold
//! quantization state ([`roles`]), which weights `--quantize` may quantize
//! ([`linear`]), in which scheme ([`scheme`]) and what it makes of each
//! tensor ([`fates`]), and what a cast loses ([`loss`]). A rule reads no
//! file and writes nothing, so Python asks the same rule the executor uses.

pub mod fates;
pub mod glob;
pub mod linear;
pub mod loss;
pub mod roles;
pub mod scheme;
pub mod target;
