//! `route`: content-based routing. An ordered table of named routes, each with a
//! [`Condition`]; a record takes the first route whose condition it meets, or the `otherwise`
//! route, and leaves on the named output of its route, `<id>.<route>`.
//!
//! The factory declares the route names (and `otherwise`) as the transform's named outputs
//! ([`TransformFactory::named_outputs`]); [`Route`] sends [`Router::route`]'s batches to them
//! with [`Outputs::emit_to`]. A record that meets no `when` and has no `otherwise` route is
//! dropped and counted as `unrouted`.
//!
//! [`RouteConfig::as_filters`] gives the exact equivalent `filter` of each route (the earlier
//! routes' conditions negated in the later ones), for tests and for tools that want them.

use std::sync::Arc;

use serde::Deserialize;
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, Kind, Outputs, PortType, Transform,
    TransformFactory, ValidateContext,
};

use crate::filter::{Condition, Matcher, split};
use crate::util::config_error;

/// One route of a [`RouteConfig`].
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The route's name (letters, digits, `_`, `-`): its output is `<id>.<name>`.
    pub name: String,
    /// The records this route takes (unless an earlier route took them).
    pub when: Condition,
}

/// A routing table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The routes, tried in order; a record takes the first whose `when` it meets.
    pub routes: Vec<RouteSpec>,
    /// The route of the records that meet no `when`; without it they are dropped (counted as
    /// `unrouted`).
    #[serde(default)]
    pub otherwise: Option<String>,
}

/// Route names that would clash with the engine's side outputs.
const RESERVED: [&str; 2] = ["errors", "late"];

fn check_name(name: &str, option: &str, seen: &[&str]) -> Result<(), ConfigError> {
    if name.is_empty()
        || !name.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
    {
        return Err(ConfigError::at_field(
            option,
            format!("route name {name:?} must be letters, digits, `_` or `-`"),
        ));
    }
    if RESERVED.contains(&name) {
        return Err(ConfigError::at_field(
            option,
            format!("`{name}` names a side output; choose another route name"),
        ));
    }
    if seen.contains(&name) {
        return Err(ConfigError::at_field(option, format!("route `{name}` is named twice")));
    }
    Ok(())
}

impl RouteConfig {
    /// Checks the names (not the conditions, which need the input type): at least one route,
    /// names of letters, digits, `_` and `-`, none twice, none `errors` or `late`.
    pub fn check_names(&self) -> Result<(), ConfigError> {
        if self.routes.is_empty() {
            return Err(ConfigError::at_field("routes", "`routes` is empty")
                .with_hint("[[transforms.<id>.routes]] name = \"hot\", when = { ... }"));
        }
        let mut seen: Vec<&str> = Vec::new();
        for route in &self.routes {
            check_name(&route.name, "routes", &seen)?;
            seen.push(&route.name);
        }
        if let Some(otherwise) = &self.otherwise {
            check_name(otherwise, "otherwise", &seen)?;
        }
        Ok(())
    }

    /// The route names in output order: the routes, then `otherwise`.
    pub fn names(&self) -> Vec<&str> {
        self.routes
            .iter()
            .map(|route| route.name.as_str())
            .chain(self.otherwise.as_deref())
            .collect()
    }

    /// The `filter` condition of each route, `(name, condition)`, that selects exactly the
    /// records the route takes: route `i` is `all = [not earlier_0, ..., not earlier_i-1,
    /// when_i]`, `otherwise` is `not = { any = [every when] }`.
    pub fn as_filters(&self) -> Vec<(String, Condition)> {
        let mut filters = Vec::new();
        for (index, route) in self.routes.iter().enumerate() {
            let condition = if index == 0 {
                route.when.clone()
            } else {
                let mut all: Vec<Condition> = self.routes[..index]
                    .iter()
                    .map(|earlier| Condition {
                        not: Some(Box::new(earlier.when.clone())),
                        ..Condition::default()
                    })
                    .collect();
                all.push(route.when.clone());
                Condition { all: Some(all), ..Condition::default() }
            };
            filters.push((route.name.clone(), condition));
        }
        if let Some(otherwise) = &self.otherwise {
            let any = self.routes.iter().map(|route| route.when.clone()).collect();
            let none = Condition { any: Some(any), ..Condition::default() };
            filters.push((
                otherwise.clone(),
                Condition { not: Some(Box::new(none)), ..Condition::default() },
            ));
        }
        filters
    }
}

/// Routes records by a [`RouteConfig`].
#[derive(Debug)]
pub struct Router {
    names: Vec<Arc<str>>,
    matchers: Vec<Matcher>,
    otherwise: Option<usize>,
}

impl Router {
    /// Checks `config` against the input port (see [`Matcher::new`]) and builds the router.
    pub fn new(config: &RouteConfig, input: &PortType) -> Result<Router, ConfigError> {
        config.check_names()?;
        let mut matchers = Vec::with_capacity(config.routes.len());
        for (index, route) in config.routes.iter().enumerate() {
            let path = format!("routes[{index}].when");
            matchers.push(Matcher::nested(&route.when, input, Some(("routes", &path)))?);
        }
        Ok(Router {
            names: config.names().into_iter().map(Arc::from).collect(),
            otherwise: config.otherwise.as_ref().map(|_| config.routes.len()),
            matchers,
        })
    }

    /// The route names, in the order of [`Router::route`]'s batches.
    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    /// Splits `batch` by route: one entry per name (`None` when the route got nothing), and
    /// the number of records no route took. A batch of another kind than readings, windows or
    /// scores comes back as `Err`.
    pub fn route(&mut self, batch: Batch) -> Result<(Vec<Option<Batch>>, u64), Batch> {
        let Router { names, matchers, otherwise } = self;
        split(batch, names.len(), |record| {
            matchers.iter_mut().position(|matcher| matcher.matches(record)).or(*otherwise)
        })
    }

    /// A field that the records of a schema seen lately lack (compared as NaN), once.
    fn take_unknown(&mut self) -> Option<Box<str>> {
        self.matchers.iter_mut().find_map(Matcher::take_unknown)
    }
}

// ---------------------------------------------------------------------------------------------
// The transform
// ---------------------------------------------------------------------------------------------

/// Factory of the `route` transform: its named outputs are the route names, then `otherwise`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RouteFactory;

impl TransformFactory for RouteFactory {
    type Config = RouteConfig;

    fn accepts(&self, _config: &RouteConfig) -> Vec<Kind> {
        vec![Kind::Readings, Kind::Windows, Kind::Scores]
    }

    fn validate(&self, config: &RouteConfig, _ctx: &ValidateContext) -> Result<(), ConfigError> {
        config.check_names()
    }

    fn output_type(
        &self,
        config: &RouteConfig,
        input: &PortType,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        Router::new(config, input)?;
        Ok(input.clone())
    }

    fn named_outputs(&self, config: &RouteConfig) -> Vec<String> {
        config.names().into_iter().map(str::to_owned).collect()
    }

    fn build(
        &self,
        config: &RouteConfig,
        _ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        Ok(Box::new(Route::new(config)?))
    }
}

/// The `route` transform: each record leaves on the named output of the first route whose
/// condition it meets, or of `otherwise`.
#[derive(Debug)]
pub struct Route {
    /// One router per kind of record the table applies to: the input's kind is known at
    /// validation, not when an instance is built.
    routers: Vec<(Kind, Router)>,
}

impl Route {
    /// A route transform for `config` (checked for every kind it may be used with).
    pub fn new(config: &RouteConfig) -> Result<Route, ComponentError> {
        let mut routers = Vec::new();
        let mut first_error = None;
        for kind in [Kind::Readings, Kind::Windows, Kind::Scores] {
            match Router::new(config, &PortType::of(kind)) {
                Ok(router) => routers.push((kind, router)),
                Err(error) => first_error = first_error.or(Some(error)),
            }
        }
        match (routers.is_empty(), first_error) {
            (true, Some(error)) => Err(config_error(error)),
            _ => Ok(Route { routers }),
        }
    }
}

impl Transform for Route {
    fn process_batch(&mut self, batch: Batch, out: &mut Outputs) {
        let kind = batch.kind();
        let Some((_, router)) = self.routers.iter_mut().find(|(known, _)| *known == kind) else {
            out.error(
                "unsupported_kind",
                format!("this routing table does not apply to {kind}"),
                None,
                None,
            );
            return;
        };
        match router.route(batch) {
            Ok((routed, unrouted)) => {
                if let Some(field) = router.take_unknown() {
                    out.error(
                        "unknown_field",
                        format!("the {kind} have no field `{field}`; it compares as NaN"),
                        None,
                        None,
                    );
                }
                out.discard("unrouted", unrouted);
                for (port, batch) in routed.into_iter().enumerate() {
                    if let Some(batch) = batch {
                        out.emit_to(port, batch);
                    }
                }
            }
            Err(other) => out.error(
                "unsupported_kind",
                format!("route reads readings, windows or scores, not {}", other.kind()),
                None,
                None,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use tidewatch_api::{
        ConfigValue, DeviceId, Kind, LABEL_ANOMALY, LABEL_NORMAL, Outputs, ReadingBatch, Schema,
        Transform,
    };

    use super::*;
    use crate::filter::Filter;

    const TABLE: &str = r#"
        otherwise = "normal"

        [[routes]]
        name = "critical"
        when = { field = "temperature", op = "gt", value = 90.0 }

        [[routes]]
        name = "warm"
        when = { any = [ { field = "temperature", op = "gt", value = 70.0 }, { label = true } ] }
    "#;

    fn config(toml: &str) -> RouteConfig {
        ConfigValue::parse(toml).expect("toml").deserialize().expect("routes")
    }

    fn port() -> PortType {
        PortType::with_schema(Kind::Readings, Arc::new(Schema::new(["temperature"])))
    }

    fn readings() -> ReadingBatch {
        let mut batch = ReadingBatch::new(Arc::new(Schema::new(["temperature"])));
        for (time, (value, label)) in [
            (95.0, LABEL_NORMAL),
            (75.0, LABEL_NORMAL),
            (20.0, LABEL_ANOMALY),
            (20.0, LABEL_NORMAL),
            (f32::NAN, LABEL_NORMAL),
            (99.0, LABEL_ANOMALY),
        ]
        .into_iter()
        .enumerate()
        {
            batch.push(DeviceId::intern("r"), time as i64, &[value], label);
        }
        batch
    }

    fn times(batch: Option<Batch>) -> Vec<i64> {
        match batch {
            Some(Batch::Readings(readings)) => readings.times,
            None => Vec::new(),
            Some(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn first_matching_route_wins_and_the_rest_go_otherwise() {
        let mut router = Router::new(&config(TABLE), &port()).expect("router");
        let names: Vec<&str> = router.names().iter().map(|name| &**name).collect();
        assert_eq!(names, ["critical", "warm", "normal"]);
        let (routed, unrouted) = router.route(Batch::Readings(readings())).expect("readings");
        assert_eq!(unrouted, 0);
        let routed: Vec<Vec<i64>> = routed.into_iter().map(times).collect();
        assert_eq!(routed, [vec![0, 5], vec![1, 2], vec![3, 4]]);

        let without_otherwise = TABLE.replace("otherwise = \"normal\"", "");
        let mut router = Router::new(&config(&without_otherwise), &port()).expect("router");
        let (routed, unrouted) = router.route(Batch::Readings(readings())).expect("readings");
        assert_eq!(routed.len(), 2);
        assert_eq!(unrouted, 2);
    }

    /// The filters of `as_filters`, each on the whole input, select what the router routes.
    #[test]
    fn equivalent_filters_select_the_same_records() {
        let table = config(TABLE);
        let mut router = Router::new(&table, &port()).expect("router");
        let (routed, _) = router.route(Batch::Readings(readings())).expect("readings");
        let filters = table.as_filters();
        assert_eq!(filters.len(), routed.len());
        for ((name, condition), routed) in filters.into_iter().zip(routed) {
            let mut filter = Filter::new(&condition).expect("filter");
            let mut out = Outputs::new(&name);
            filter.process_batch(Batch::Readings(readings()), &mut out);
            assert_eq!(times(out.take_main().pop()), times(routed), "route {name}");
        }
    }

    #[test]
    fn the_transform_sends_each_route_to_its_named_output() {
        let factory = RouteFactory;
        let table = config(TABLE);
        assert_eq!(factory.named_outputs(&table), ["critical", "warm", "normal"]);
        let mut route = Route::new(&table).expect("route");
        let mut out = Outputs::new("r");
        route.process_batch(Batch::Readings(readings()), &mut out);
        assert!(out.take_main().is_empty(), "a route has no main output");
        let named: Vec<(usize, Vec<i64>)> =
            out.take_named().into_iter().map(|(port, batch)| (port, times(Some(batch)))).collect();
        assert_eq!(named, [(0, vec![0, 5]), (1, vec![1, 2]), (2, vec![3, 4])]);

        let mut unrouted =
            Route::new(&config(&TABLE.replace("otherwise = \"normal\"", ""))).expect("route");
        unrouted.process_batch(Batch::Readings(readings()), &mut out);
        assert_eq!(out.take_discarded(), [("unrouted", 2)]);
        unrouted.process_batch(Batch::Errors(Vec::new()), &mut out);
        assert_eq!(out.take_errors().len(), 1);
    }

    #[test]
    fn invalid_tables() {
        for (toml, field) in [
            ("routes = []", "routes"),
            ("[[routes]]\nname = \"a b\"\nwhen = { label = true }", "routes"),
            ("[[routes]]\nname = \"errors\"\nwhen = { label = true }", "routes"),
            (
                "[[routes]]\nname = \"a\"\nwhen = { label = true }\n[[routes]]\nname = \"a\"\nwhen = { label = false }",
                "routes",
            ),
            ("otherwise = \"a\"\n[[routes]]\nname = \"a\"\nwhen = { label = true }", "otherwise"),
            (
                "[[routes]]\nname = \"a\"\nwhen = { field = \"nope\", op = \"gt\", value = 1 }",
                "routes",
            ),
            ("[[routes]]\nname = \"a\"\nwhen = {}", "routes"),
        ] {
            let error = Router::new(&config(toml), &port()).expect_err(toml);
            assert_eq!(error.field.as_deref(), Some(field), "{toml}: {error:?}");
        }
        let nested = Router::new(
            &config("[[routes]]\nname = \"a\"\nwhen = { any = [ { op = \"gt\" } ] }"),
            &port(),
        )
        .expect_err("nested");
        assert!(nested.message.starts_with("routes[0].when.any[0]: "), "{}", nested.message);
    }
}
