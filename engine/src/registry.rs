//! The registry of component types.
//!
//! The engine knows no component type of its own: the built-ins live above it (the `tidewatch`
//! crate's `builtins()`), so the engine depends only on the extension API.

use std::collections::BTreeMap;

use tidewatch_api::ComponentFactory;

/// The three classes of components, as the pipeline file's top-level tables name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// `[sources.<id>]`
    Source,
    /// `[transforms.<id>]`
    Transform,
    /// `[sinks.<id>]`
    Sink,
}

impl Class {
    /// The singular name (`source`, `transform`, `sink`).
    pub fn name(self) -> &'static str {
        match self {
            Class::Source => "source",
            Class::Transform => "transform",
            Class::Sink => "sink",
        }
    }

    /// The top-level table (`sources`, `transforms`, `sinks`).
    pub fn table(self) -> &'static str {
        match self {
            Class::Source => "sources",
            Class::Transform => "transforms",
            Class::Sink => "sinks",
        }
    }

    fn of(factory: &ComponentFactory) -> Class {
        match factory {
            ComponentFactory::Source(_) => Class::Source,
            ComponentFactory::Transform(_) => Class::Transform,
            ComponentFactory::Sink(_) => Class::Sink,
        }
    }
}

/// Component types by class and name. A plain explicit list: nothing registers itself.
///
/// The built-in types come from the `tidewatch` crate (`tidewatch::builtins()`, or
/// `Registry::with_builtins()` with its `BuiltinsExt` in scope); an engine alone starts empty.
///
/// ```
/// use tidewatch_api::ComponentFactory;
/// use tidewatch_connectors::SimulatorFactory;
/// use tidewatch_engine::{Class, Registry};
///
/// let registry = Registry::new().register("simulator", ComponentFactory::source(SimulatorFactory));
/// assert_eq!(registry.names(Class::Source), ["simulator"]);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Registry {
    factories: BTreeMap<(Class, String), ComponentFactory>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The built-in types, for the engine's own tests (which take the operators and
    /// connectors as dev-dependencies; the real list is `tidewatch::builtins()`).
    #[cfg(test)]
    pub(crate) fn test_builtins() -> Registry {
        tidewatch_connectors::builtins()
            .into_iter()
            .chain(tidewatch_operators::builtins())
            .fold(Registry::new(), |registry, (name, factory)| registry.register(name, factory))
    }

    /// Adds (or replaces) the component type `name`; its class comes from the factory.
    pub fn register(mut self, name: &str, factory: ComponentFactory) -> Registry {
        self.insert(name, factory);
        self
    }

    /// Adds (or replaces) the component type `name` in place.
    pub fn insert(&mut self, name: &str, factory: ComponentFactory) {
        self.factories.insert((Class::of(&factory), name.to_owned()), factory);
    }

    /// The factory of `class` named `name`.
    pub fn get(&self, class: Class, name: &str) -> Option<&ComponentFactory> {
        self.factories.get(&(class, name.to_owned()))
    }

    /// The names registered for `class`, sorted.
    pub fn names(&self, class: Class) -> Vec<&str> {
        self.factories
            .keys()
            .filter(|(candidate, _)| *candidate == class)
            .map(|(_, name)| name.as_str())
            .collect()
    }
}
