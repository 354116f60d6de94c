//! Services and the built-in ones: [`service`] (starting, finding and calling services), the
//! result [`cache`], the key/value store [`kv`], and [`bypass`] (its plan, providers, conditions,
//! file server). Built on [`crate::driver`].

pub mod bypass;
pub mod cache;
pub mod kv;
pub mod service;
