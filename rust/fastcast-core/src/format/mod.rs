//! What is on disk, read and written: safetensors headers ([`header`]), a
//! sharded checkpoint's index json ([`index`]), the resume journal
//! ([`journal`]) and PyTorch `torch.save` files ([`torchfile`]). What these
//! read is untrusted: each is validated once, here, and trusted after.

pub mod header;
pub mod index;
pub mod journal;
pub mod torchfile;
