#![no_std]
// This file exists so that sensor-user can depend on this crate as a build-dependency
// (aya-build rebuilds the object when the crate changes).
