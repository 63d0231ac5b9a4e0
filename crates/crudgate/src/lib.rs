//! crudgate: the write path of PowerSync apps.
pub mod auth;
