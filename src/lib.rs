//! tidewatch
