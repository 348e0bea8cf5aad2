//! `convert`: per-feature unit conversions and linear transforms, applied after a value is
//! read and before it is scaled.

use serde::Deserialize;
use tidewatch_api::ConfigError;

/// How one feature's value is converted after it is read (`[transforms.<id>.convert.<feature>]`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Conversion {
    /// `x * scale + offset`.
    Linear {
        /// Factor (default 1).
        #[serde(default = "one")]
        scale: f64,
        /// Added after the factor (default 0).
        #[serde(default)]
        offset: f64,
    },
    /// From one unit to another of the same quantity (see [`Unit`]).
    Unit {
        /// The unit the payload uses.
        from: Unit,
        /// The unit of the readings.
        to: Unit,
    },
}

fn one() -> f64 {
    1.0
}

/// The physical quantity a [`Unit`] measures; conversions stay within one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantity {
    /// Temperature.
    Temperature,
    /// Pressure.
    Pressure,
    /// Volume flow.
    Flow,
    /// Velocity (vibration velocity).
    Velocity,
    /// Acceleration (vibration acceleration).
    Acceleration,
    /// Length (displacement).
    Length,
    /// Electric current.
    Current,
    /// Voltage.
    Voltage,
}

impl Quantity {
    fn name(self) -> &'static str {
        match self {
            Quantity::Temperature => "temperature",
            Quantity::Pressure => "pressure",
            Quantity::Flow => "flow",
            Quantity::Velocity => "velocity",
            Quantity::Acceleration => "acceleration",
            Quantity::Length => "length",
            Quantity::Current => "current",
            Quantity::Voltage => "voltage",
        }
    }
}

/// A unit of the conversion table. Each unit is a linear function of its quantity's base unit
/// (`base = x * factor + offset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Unit {
    /// Degrees Celsius (base of temperature).
    #[serde(rename = "degC", alias = "C", alias = "celsius")]
    DegC,
    /// Degrees Fahrenheit.
    #[serde(rename = "degF", alias = "F", alias = "fahrenheit")]
    DegF,
    /// Kelvin.
    #[serde(rename = "K", alias = "kelvin")]
    Kelvin,
    /// Pascal (base of pressure).
    #[serde(rename = "Pa")]
    Pa,
    /// Hectopascal (= millibar).
    #[serde(rename = "hPa")]
    HPa,
    /// Kilopascal.
    #[serde(rename = "kPa")]
    KPa,
    /// Megapascal.
    #[serde(rename = "MPa")]
    MPa,
    /// Millibar.
    #[serde(rename = "mbar")]
    Mbar,
    /// Bar (100 000 Pa).
    #[serde(rename = "bar")]
    Bar,
    /// Pound-force per square inch (6 894.757 Pa).
    #[serde(rename = "psi")]
    Psi,
    /// Cubic metres per hour (base of flow).
    #[serde(rename = "m3_h", alias = "m3h")]
    M3PerHour,
    /// Litres per minute.
    #[serde(rename = "l_min", alias = "lpm")]
    LitrePerMinute,
    /// Litres per second.
    #[serde(rename = "l_s")]
    LitrePerSecond,
    /// US gallons per minute.
    #[serde(rename = "gal_min", alias = "gpm")]
    GallonPerMinute,
    /// Millimetres per second (base of velocity).
    #[serde(rename = "mm_s")]
    MmPerSecond,
    /// Metres per second.
    #[serde(rename = "m_s")]
    MPerSecond,
    /// Inches per second.
    #[serde(rename = "in_s")]
    InchPerSecond,
    /// Metres per second squared (base of acceleration).
    #[serde(rename = "m_s2")]
    MPerSecond2,
    /// Standard gravity, 9.806 65 m/s².
    #[serde(rename = "g")]
    StandardGravity,
    /// Millimetres (base of length).
    #[serde(rename = "mm")]
    Mm,
    /// Metres.
    #[serde(rename = "m")]
    Metre,
    /// Inches.
    #[serde(rename = "in")]
    Inch,
    /// Amperes (base of current).
    #[serde(rename = "A")]
    Ampere,
    /// Milliamperes.
    #[serde(rename = "mA")]
    MilliAmpere,
    /// Volts (base of voltage).
    #[serde(rename = "V")]
    Volt,
    /// Millivolts.
    #[serde(rename = "mV")]
    MilliVolt,
}

impl Unit {
    /// The unit's quantity and `(factor, offset)` such that `base = x * factor + offset`.
    pub fn definition(self) -> (Quantity, f64, f64) {
        use Quantity::*;
        match self {
            Unit::DegC => (Temperature, 1.0, 0.0),
            Unit::DegF => (Temperature, 5.0 / 9.0, -32.0 * 5.0 / 9.0),
            Unit::Kelvin => (Temperature, 1.0, -273.15),
            Unit::Pa => (Pressure, 1.0, 0.0),
            Unit::HPa | Unit::Mbar => (Pressure, 100.0, 0.0),
            Unit::KPa => (Pressure, 1e3, 0.0),
            Unit::MPa => (Pressure, 1e6, 0.0),
            Unit::Bar => (Pressure, 1e5, 0.0),
            Unit::Psi => (Pressure, 6_894.757_293_168_361, 0.0),
            Unit::M3PerHour => (Flow, 1.0, 0.0),
            Unit::LitrePerMinute => (Flow, 0.06, 0.0),
            Unit::LitrePerSecond => (Flow, 3.6, 0.0),
            Unit::GallonPerMinute => (Flow, 3.785_411_784e-3 * 60.0, 0.0),
            Unit::MmPerSecond => (Velocity, 1.0, 0.0),
            Unit::MPerSecond => (Velocity, 1e3, 0.0),
            Unit::InchPerSecond => (Velocity, 25.4, 0.0),
            Unit::MPerSecond2 => (Acceleration, 1.0, 0.0),
            Unit::StandardGravity => (Acceleration, 9.806_65, 0.0),
            Unit::Mm => (Length, 1.0, 0.0),
            Unit::Metre => (Length, 1e3, 0.0),
            Unit::Inch => (Length, 25.4, 0.0),
            Unit::Ampere => (Current, 1.0, 0.0),
            Unit::MilliAmpere => (Current, 1e-3, 0.0),
            Unit::Volt => (Voltage, 1.0, 0.0),
            Unit::MilliVolt => (Voltage, 1e-3, 0.0),
        }
    }
}

/// A conversion reduced to `x * scale + offset`, computed in `f64`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Linear {
    pub(crate) scale: f64,
    pub(crate) offset: f64,
}

impl Linear {
    #[inline]
    pub(crate) fn apply(self, value: f32) -> f32 {
        (f64::from(value) * self.scale + self.offset) as f32
    }
}

impl Conversion {
    /// The conversion as one linear function; an error for units of different quantities or
    /// a non-finite factor.
    pub(crate) fn linear(&self, feature: &str) -> Result<Linear, ConfigError> {
        let linear = match *self {
            Conversion::Linear { scale, offset } => {
                if !scale.is_finite() || !offset.is_finite() {
                    return Err(ConfigError::at_field(
                        "convert",
                        format!("`convert.{feature}`: `scale` and `offset` must be finite"),
                    ));
                }
                Linear { scale, offset }
            }
            Conversion::Unit { from, to } => {
                let (from_quantity, from_factor, from_offset) = from.definition();
                let (to_quantity, to_factor, to_offset) = to.definition();
                if from_quantity != to_quantity {
                    return Err(ConfigError::at_field(
                        "convert",
                        format!(
                            "`convert.{feature}`: cannot convert {} ({from:?}) to {} ({to:?})",
                            from_quantity.name(),
                            to_quantity.name()
                        ),
                    )
                    .with_hint("`from` and `to` must measure the same quantity"));
                }
                // base = x * f1 + o1; y = (base - o2) / f2
                Linear {
                    scale: from_factor / to_factor,
                    offset: (from_offset - to_offset) / to_factor,
                }
            }
        };
        Ok(linear)
    }
}

#[cfg(test)]
mod tests {
    use tidewatch_api::ConfigValue;

    use super::*;

    fn convert(from: &str, to: &str, value: f64) -> f64 {
        let toml = format!("type = \"unit\"\nfrom = \"{from}\"\nto = \"{to}\"");
        let conversion: Conversion =
            ConfigValue::parse(&toml).expect("toml").deserialize().expect("conversion");
        let linear = conversion.linear("x").expect("same quantity");
        value * linear.scale + linear.offset
    }

    fn close(actual: f64, expected: f64) {
        let tolerance = 1e-9 * expected.abs().max(1.0);
        assert!((actual - expected).abs() <= tolerance, "{actual} != {expected}");
    }

    #[test]
    fn temperatures() {
        close(convert("degF", "degC", 212.0), 100.0);
        close(convert("degF", "degC", 32.0), 0.0);
        close(convert("degC", "degF", 37.0), 98.6);
        close(convert("C", "K", 0.0), 273.15);
        close(convert("kelvin", "fahrenheit", 0.0), -459.67);
        close(convert("degF", "degF", 50.0), 50.0);
    }

    #[test]
    fn pressures() {
        close(convert("bar", "psi", 1.0), 14.503_773_773_020_923);
        close(convert("psi", "bar", 14.503_773_773_020_923), 1.0);
        close(convert("kPa", "bar", 100.0), 1.0);
        close(convert("Pa", "kPa", 2500.0), 2.5);
        close(convert("MPa", "bar", 1.0), 10.0);
        close(convert("mbar", "hPa", 7.0), 7.0);
        close(convert("psi", "kPa", 1.0), 6.894_757_293_168_361);
    }

    #[test]
    fn flows_velocities_lengths_currents() {
        close(convert("m3_h", "l_min", 1.0), 1000.0 / 60.0);
        close(convert("lpm", "m3h", 60.0), 3.6);
        close(convert("l_s", "l_min", 1.0), 60.0);
        close(convert("gpm", "l_min", 1.0), 3.785_411_784);
        close(convert("in_s", "mm_s", 1.0), 25.4);
        close(convert("mm_s", "in_s", 25.4), 1.0);
        close(convert("m_s", "mm_s", 0.01), 10.0);
        close(convert("g", "m_s2", 1.0), 9.806_65);
        close(convert("in", "mm", 2.0), 50.8);
        close(convert("m", "mm", 1.5), 1500.0);
        close(convert("mA", "A", 1500.0), 1.5);
        close(convert("A", "mA", 0.02), 20.0);
        close(convert("mV", "V", 250.0), 0.25);
    }

    #[test]
    fn mismatched_quantities_and_unknown_units_are_rejected() {
        let conversion = Conversion::Unit { from: Unit::Bar, to: Unit::DegC };
        let error = conversion.linear("p").expect_err("pressure to temperature");
        assert_eq!(error.field.as_deref(), Some("convert"));
        assert!(error.message.contains("pressure"), "{}", error.message);

        let unknown = ConfigValue::parse("type = \"unit\"\nfrom = \"furlong\"\nto = \"m\"")
            .expect("toml")
            .deserialize::<Conversion>()
            .expect_err("unknown unit");
        assert!(unknown.message.contains("furlong"), "{}", unknown.message);

        let untagged = ConfigValue::parse("scale = 2.0")
            .expect("toml")
            .deserialize::<Conversion>()
            .expect_err("the type tag is required");
        assert!(untagged.message.contains("type"), "{}", untagged.message);

        let stray = ConfigValue::parse("type = \"linear\"\nscale = 2.0\nfrom = \"degC\"")
            .expect("toml")
            .deserialize::<Conversion>()
            .expect_err("unknown field of a linear conversion");
        assert!(stray.message.contains("from"), "{}", stray.message);

        let infinite = Conversion::Linear { scale: f64::INFINITY, offset: 0.0 };
        assert!(infinite.linear("x").is_err());
    }

    #[test]
    fn linear_defaults() {
        let conversion: Conversion = ConfigValue::parse("type = \"linear\"\noffset = 32.0")
            .expect("toml")
            .deserialize()
            .expect("linear");
        assert_eq!(conversion, Conversion::Linear { scale: 1.0, offset: 32.0 });
        let linear = conversion.linear("t").expect("linear");
        assert_eq!(linear.apply(1.0), 33.0);
    }
}
