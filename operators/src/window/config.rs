//! The options of the `window` transform and their checks, shared by time windows
//! ([`super::time`]) and count windows ([`super::count`]).

use serde::Deserialize;
use tidewatch_api::{ConfigError, EventTime};

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// Options of the `window` transform.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Length of each window, ms (greater than 0). Exactly one of `size_ms` and
    /// `size_readings` is given.
    #[serde(default)]
    pub size_ms: Option<u64>,
    /// Distance between the starts of consecutive windows, ms; defaults to `size_ms`
    /// (tumbling windows). Must satisfy `0 < slide_ms <= size_ms`.
    #[serde(default)]
    pub slide_ms: Option<u64>,
    /// Windows with fewer readings than this are discarded (counted as `too_few_steps`).
    #[serde(default = "default_min_steps")]
    pub min_steps: usize,
    /// Count windows: each window holds a device's last `size_readings` readings in event-time
    /// order (greater than 0).
    #[serde(default)]
    pub size_readings: Option<usize>,
    /// Count windows: a window every `slide_readings` readings (default 1: a window ending at
    /// every reading). Must satisfy `0 < slide_readings <= size_readings`.
    #[serde(default)]
    pub slide_readings: Option<usize>,
    /// Session windows: a device's session ends once `gap_ms` pass without a reading of it,
    /// ms (greater than 0). Not with `size_ms` or `size_readings`.
    #[serde(default)]
    pub gap_ms: Option<u64>,
    /// Session windows: the longest a session lasts, ms; a reading `max_size_ms` or more after
    /// the session's first one starts the next session. Default: no limit.
    #[serde(default)]
    pub max_size_ms: Option<u64>,
}

fn default_min_steps() -> usize {
    1
}

impl WindowConfig {
    /// Tumbling windows of `size_ms`, with `min_steps` = 1.
    pub fn tumbling(size_ms: u64) -> WindowConfig {
        WindowConfig {
            size_ms: Some(size_ms),
            slide_ms: None,
            min_steps: 1,
            size_readings: None,
            slide_readings: None,
            gap_ms: None,
            max_size_ms: None,
        }
    }

    /// Count windows of a device's last `size` readings, one every `slide` readings.
    pub fn count(size: usize, slide: usize) -> WindowConfig {
        WindowConfig {
            size_ms: None,
            slide_ms: None,
            min_steps: 1,
            size_readings: Some(size),
            slide_readings: Some(slide),
            gap_ms: None,
            max_size_ms: None,
        }
    }

    /// Session windows that end after `gap_ms` without a reading, lasting at most
    /// `max_size_ms` when given, with `min_steps` = 1.
    pub fn session(gap_ms: u64, max_size_ms: Option<u64>) -> WindowConfig {
        WindowConfig {
            size_ms: None,
            slide_ms: None,
            min_steps: 1,
            size_readings: None,
            slide_readings: None,
            gap_ms: Some(gap_ms),
            max_size_ms,
        }
    }

    /// True for session windows (`gap_ms`).
    pub fn is_session(&self) -> bool {
        self.gap_ms.is_some()
    }

    /// True for count windows (`size_readings`).
    pub fn is_count(&self) -> bool {
        self.size_readings.is_some()
    }

    /// Sliding windows of `size_ms` every `slide_ms`, with `min_steps` = 1.
    pub fn sliding(size_ms: u64, slide_ms: u64) -> WindowConfig {
        WindowConfig {
            size_ms: Some(size_ms),
            slide_ms: Some(slide_ms),
            min_steps: 1,
            size_readings: None,
            slide_readings: None,
            gap_ms: None,
            max_size_ms: None,
        }
    }
}

/// The longest window, ms (about 285 years): keeps every window bound far from overflow.
pub const MAX_WINDOW_SIZE_MS: u64 = 1 << 53;
/// The most windows one reading may belong to (`ceil(size_ms / slide_ms)`).
pub const MAX_WINDOWS_PER_READING: u64 = 10_000;
/// Readings with an event time beyond ±this many ms are rejected (`bad_timestamp`).
pub(crate) const MAX_ABS_TIME_MS: EventTime = 1 << 62;

/// The checked options.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub(crate) size: EventTime,
    pub(crate) slide: EventTime,
    pub(crate) min_steps: usize,
}

/// Checks time-window options.
pub(crate) fn geometry(config: &WindowConfig) -> Result<Geometry, ConfigError> {
    if config.size_readings.is_some() || config.slide_readings.is_some() {
        return Err(ConfigError::new("these are count-window options (`size_readings`)"));
    }
    session_options_alone(config)?;
    let Some(size_ms) = config.size_ms else {
        return Err(ConfigError::new(
            "`window` needs `size_ms` (time windows) or `size_readings` (count windows)",
        )
        .with_hint("e.g. size_ms = 10000 for 10 s windows"));
    };
    if size_ms == 0 {
        return Err(ConfigError::at_field("size_ms", "`size_ms` must be greater than 0")
            .with_hint("e.g. size_ms = 10000 for 10 s windows"));
    }
    if size_ms > MAX_WINDOW_SIZE_MS {
        return Err(ConfigError::at_field(
            "size_ms",
            format!("`size_ms` must be at most {MAX_WINDOW_SIZE_MS}"),
        ));
    }
    let slide = config.slide_ms.unwrap_or(size_ms);
    if slide == 0 || slide > size_ms {
        return Err(ConfigError::at_field(
            "slide_ms",
            format!("`slide_ms` must be in 1..={size_ms} (`size_ms`)"),
        )
        .with_hint("leave `slide_ms` out for tumbling windows"));
    }
    let overlap = size_ms.div_ceil(slide);
    if overlap > MAX_WINDOWS_PER_READING {
        return Err(ConfigError::at_field(
            "slide_ms",
            format!(
                "each reading would belong to {overlap} windows; at most \
                 {MAX_WINDOWS_PER_READING} are allowed"
            ),
        )
        .with_hint("use a larger `slide_ms`"));
    }
    if config.min_steps == 0 {
        return Err(ConfigError::at_field("min_steps", "`min_steps` must be at least 1"));
    }
    Ok(Geometry {
        size: size_ms as EventTime,
        slide: slide as EventTime,
        min_steps: config.min_steps,
    })
}

/// Rejects session-window options in time- or count-window options.
fn session_options_alone(config: &WindowConfig) -> Result<(), ConfigError> {
    if config.gap_ms.is_some() {
        return Err(ConfigError::at_field(
            "gap_ms",
            "give one of `size_ms` (time windows), `size_readings` (count windows) and \
             `gap_ms` (session windows)",
        ));
    }
    if config.max_size_ms.is_some() {
        return Err(ConfigError::at_field(
            "max_size_ms",
            "`max_size_ms` limits session windows: it needs `gap_ms`",
        )
        .with_hint("for time windows the length is `size_ms`"));
    }
    Ok(())
}

/// The checked options of session windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SessionGeometry {
    pub(crate) gap: EventTime,
    pub(crate) max_size: Option<EventTime>,
    pub(crate) min_steps: usize,
}

/// Checks session-window options.
pub(crate) fn session_geometry(config: &WindowConfig) -> Result<SessionGeometry, ConfigError> {
    if config.size_ms.is_some()
        || config.slide_ms.is_some()
        || config.size_readings.is_some()
        || config.slide_readings.is_some()
    {
        return Err(ConfigError::at_field(
            "gap_ms",
            "give one of `size_ms` (time windows), `size_readings` (count windows) and \
             `gap_ms` (session windows)",
        ));
    }
    let in_range = |field: &str, value: u64| {
        if value == 0 || value > MAX_WINDOW_SIZE_MS {
            Err(ConfigError::at_field(
                field,
                format!("`{field}` must be in 1..={MAX_WINDOW_SIZE_MS}"),
            ))
        } else {
            Ok(value as EventTime)
        }
    };
    let gap = in_range("gap_ms", config.gap_ms.unwrap_or(0))?;
    let max_size = config.max_size_ms.map(|max| in_range("max_size_ms", max)).transpose()?;
    if config.min_steps == 0 {
        return Err(ConfigError::at_field("min_steps", "`min_steps` must be at least 1"));
    }
    Ok(SessionGeometry { gap, max_size, min_steps: config.min_steps })
}

/// Checks count-window options; returns `(size, slide)`.
pub(crate) fn count_geometry(config: &WindowConfig) -> Result<(usize, usize), ConfigError> {
    if config.size_ms.is_some() || config.slide_ms.is_some() {
        return Err(ConfigError::at_field(
            "size_readings",
            "give either `size_ms` (time windows) or `size_readings` (count windows), not both",
        ));
    }
    session_options_alone(config)?;
    let size = config.size_readings.unwrap_or(0);
    if size == 0 {
        return Err(ConfigError::at_field("size_readings", "`size_readings` must be at least 1"));
    }
    let slide = config.slide_readings.unwrap_or(1);
    if slide == 0 || slide > size {
        return Err(ConfigError::at_field(
            "slide_readings",
            format!("`slide_readings` must be in 1..={size} (`size_readings`)"),
        ));
    }
    Ok((size, slide))
}
