//! The credentials and TLS of `store:` and `bus:`, and `require_auth`.
//!
//! Which fields a backend takes depends on its kind: Redis takes `username`, `password` and, with
//! Sentinel, the sentinels' own `sentinel_username` and `sentinel_password`; NATS takes one of a
//! token, a user and password, an nkey seed or a creds file. Both take `tls:`. Every secret may
//! be written in the file (usually as `${VAR}`) or read from a file by its `*_file` twin, at load,
//! so `corral check` finds a missing or empty secret file. No message here ever quotes a secret.
//!
//! `require_auth` (top level, or under `store:`/`bus:`) refuses a Redis or NATS backend that proves
//! no identity: a secret in its URL, a password, token, nkey seed or creds file, or a client
//! certificate (`tls.cert_file`) count; TLS with only a CA does not (it proves the server's
//! identity, not corral's). An in-process memory store or bus has no connection to protect and
//! passes.

use std::path::PathBuf;

use marked_yaml::Spanned;

use super::super::schema::{BackendFile, File, Text};
use super::super::{BusSettings, Place, StoreSettings};
use super::{Checker, Kind, boolean};
use crate::credentials::{Credentials, Secret, Tls, read_pem, read_secret_file, url_has_secret};

/// Every way a credential field can be wrong; each reads after the field's path.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("the memory {0} takes no credentials")]
    Memory(&'static str),
    #[error("not a {kind} setting ({kind} takes {takes})")]
    WrongKind {
        kind: &'static str,
        takes: &'static str,
    },
    #[error("set either {0} or {0}_file, not both")]
    Twice(&'static str),
    #[error("{0}")]
    File(String),
    #[error("the url already carries a user or password; keep one of the two")]
    AlsoInUrl,
    #[error("needs {0}")]
    Needs(&'static str),
    #[error("only for a redis+sentinel:// url")]
    NotSentinel,
    #[error("a nats connection proves its identity one way; {0} is set too")]
    SeveralWays(&'static str),
    #[error("not a nats creds file (no -----BEGIN NATS USER JWT----- block)")]
    NotCreds,
    #[error("not a valid nkey seed (expected a user seed, SU...)")]
    NkeySeed,
    #[error(
        "the bus shares the store's url and so its credentials; set bus.url to give the bus its \
         own"
    )]
    Inherited,
    #[error(
        "require_auth is set but the {kind} {role} proves no identity (give a password or token \
         in its url or as {role}.password / {role}.token, an nkey_seed, a creds_file or \
         tls.cert_file)"
    )]
    NoIdentity {
        kind: &'static str,
        role: &'static str,
    },
}

/// Kind and url of a checked store or bus.
fn kind_url_of_store(store: &StoreSettings) -> (Kind, Option<&str>) {
    match store {
        StoreSettings::Memory => (Kind::Memory, None),
        StoreSettings::Redis { url } => (Kind::Redis, Some(url)),
        StoreSettings::Nats { url } => (Kind::Nats, Some(url)),
    }
}

fn kind_url_of_bus(bus: &BusSettings) -> (Kind, Option<&str>) {
    match bus {
        BusSettings::Memory => (Kind::Memory, None),
        BusSettings::Redis { url } => (Kind::Redis, Some(url)),
        BusSettings::Nats { url } => (Kind::Nats, Some(url)),
    }
}

/// A value unless it is left empty.
fn text(value: &Option<Text>) -> Option<&Text> {
    value.as_ref().filter(|t| !t.is_empty())
}

/// The credential fields a section sets, with their names, for the checks that concern all.
fn set_fields(file: &BackendFile) -> Vec<(&'static str, &Text)> {
    let fields = [
        ("username", &file.username),
        ("password", &file.password),
        ("password_file", &file.password_file),
        ("token", &file.token),
        ("token_file", &file.token_file),
        ("nkey_seed", &file.nkey_seed),
        ("nkey_seed_file", &file.nkey_seed_file),
        ("creds_file", &file.creds_file),
        ("sentinel_username", &file.sentinel_username),
        ("sentinel_password", &file.sentinel_password),
        ("sentinel_password_file", &file.sentinel_password_file),
    ];
    fields
        .into_iter()
        .filter_map(|(name, text)| Some((name, text.as_ref().filter(|t| !t.is_empty())?)))
        .collect()
}

impl Checker<'_> {
    fn refuse(&mut self, place: Place, path: &str, refused: Refused) {
        self.problems.add(place, path, refused);
    }

    /// The store's credentials, checked against its kind and url.
    pub(super) fn store_credentials(
        &mut self,
        file: Option<&Spanned<BackendFile>>,
        store: &StoreSettings,
    ) -> Credentials {
        let Some(file) = file else {
            return Credentials::default();
        };
        let (kind, url) = kind_url_of_store(store);
        self.credentials(file, "store", kind, url)
    }

    /// The bus's credentials: the store's when the bus shares the store's url, else its own.
    pub(super) fn bus_credentials(
        &mut self,
        file: Option<&Spanned<BackendFile>>,
        bus: &BusSettings,
        store: &StoreSettings,
        store_credentials: &Credentials,
    ) -> Credentials {
        let (kind, url) = kind_url_of_bus(bus);
        let (store_kind, store_url) = kind_url_of_store(store);
        let shares = kind == store_kind && url.is_some() && url == store_url;
        let Some(file) = file else {
            return match shares {
                true => store_credentials.clone(),
                false => Credentials::default(),
            };
        };
        if shares {
            let own: Vec<(&str, Place)> = (set_fields(file).into_iter())
                .map(|(name, text)| (name, Place::of(text)))
                .chain(file.tls.as_ref().map(|tls| ("tls", Place::of(tls))))
                .collect();
            for (name, place) in own {
                self.refuse(place, &format!("bus.{name}"), Refused::Inherited);
            }
            return store_credentials.clone();
        }
        self.credentials(file, "bus", kind, url)
    }

    fn credentials(
        &mut self,
        file: &Spanned<BackendFile>,
        role: &'static str,
        kind: Kind,
        url: Option<&str>,
    ) -> Credentials {
        let path = |name: &str| format!("{role}.{name}");
        if kind == Kind::Memory {
            let fields: Vec<(&str, Place)> = (set_fields(file).into_iter())
                .map(|(name, text)| (name, Place::of(text)))
                .chain(file.tls.as_ref().map(|tls| ("tls", Place::of(tls))))
                .collect();
            for (name, place) in fields {
                self.refuse(place, &path(name), Refused::Memory(role));
            }
            return Credentials::default();
        }
        let (foreign, takes): (&[&str], _) = match kind {
            Kind::Redis => (
                &[
                    "token",
                    "token_file",
                    "nkey_seed",
                    "nkey_seed_file",
                    "creds_file",
                ],
                "username, password, sentinel_username, sentinel_password and tls",
            ),
            _ => (
                &[
                    "sentinel_username",
                    "sentinel_password",
                    "sentinel_password_file",
                ],
                "one of token, username and password, nkey_seed or creds_file, and tls",
            ),
        };
        let kind_name = kind.name();
        for (name, text) in set_fields(file) {
            if foreign.contains(&name) {
                let refused = Refused::WrongKind {
                    kind: kind_name,
                    takes,
                };
                self.refuse(Place::of(text), &path(name), refused);
            }
        }

        let password = self.secret(&file.password, &file.password_file, role, "password");
        let token = self.secret(&file.token, &file.token_file, role, "token");
        let nkey_seed = self.secret(&file.nkey_seed, &file.nkey_seed_file, role, "nkey_seed");
        let sentinel_password = self.secret(
            &file.sentinel_password,
            &file.sentinel_password_file,
            role,
            "sentinel_password",
        );
        let username = text(&file.username).map(|t| t.to_string());
        let sentinel_username = text(&file.sentinel_username).map(|t| t.to_string());

        let url = url.unwrap_or_default();
        let in_url = url.split_once("://").is_some_and(|(_, rest)| {
            rest.split(['/', '?'])
                .next()
                .unwrap_or_default()
                .contains('@')
        });
        if in_url {
            let fields = [
                ("username", text(&file.username)),
                ("password", text(&file.password)),
                ("password_file", text(&file.password_file)),
                ("token", text(&file.token)),
                ("token_file", text(&file.token_file)),
            ];
            for (name, text) in fields {
                if let Some(text) = text {
                    self.refuse(Place::of(text), &path(name), Refused::AlsoInUrl);
                }
            }
        }
        let first = |a: &Option<Text>, b: &Option<Text>| text(a).or(text(b)).map(Place::of);
        if let (Some(place), None) = (text(&file.username).map(Place::of), &password) {
            self.refuse(place, &path("password"), Refused::Needs("password"));
        }
        let is_sentinel = url.starts_with("redis+sentinel://");
        if kind == Kind::Redis && !is_sentinel {
            let place = first(&file.sentinel_username, &file.sentinel_password)
                .or_else(|| text(&file.sentinel_password_file).map(Place::of));
            if let Some(place) = place {
                self.refuse(place, &path("sentinel_password"), Refused::NotSentinel);
            }
        }
        if kind == Kind::Nats {
            if let (None, Some(place)) = (&username, first(&file.password, &file.password_file)) {
                self.refuse(place, &path("username"), Refused::Needs("username"));
            }
            let ways = [
                ("the url's user", in_url.then_some(Place::default())),
                ("token", first(&file.token, &file.token_file)),
                ("password", first(&file.password, &file.password_file)),
                ("nkey_seed", first(&file.nkey_seed, &file.nkey_seed_file)),
                ("creds_file", text(&file.creds_file).map(Place::of)),
            ];
            let mut seen = ways
                .iter()
                .filter_map(|(name, place)| Some((*name, (*place)?)));
            if let (Some(_), Some((name, place))) = (seen.next(), seen.next()) {
                self.refuse(place, &path(name), Refused::SeveralWays(name));
            }
            if let (Some(seed), Some(place)) =
                (&nkey_seed, first(&file.nkey_seed, &file.nkey_seed_file))
                && !nkeys::KeyPair::from_seed(seed.expose())
                    .is_ok_and(|pair| pair.public_key().starts_with('U'))
            {
                self.refuse(place, &path("nkey_seed"), Refused::NkeySeed);
            }
        }
        let creds_file = text(&file.creds_file).and_then(|t| {
            let file = PathBuf::from(t.as_str());
            match std::fs::read_to_string(&file) {
                Err(e) => {
                    let message = format!("cannot read {file:?}: {e}");
                    self.refuse(Place::of(t), &path("creds_file"), Refused::File(message));
                    None
                }
                Ok(text) if !text.contains("-----BEGIN NATS USER JWT-----") => {
                    self.refuse(Place::of(t), &path("creds_file"), Refused::NotCreds);
                    None
                }
                Ok(_) => Some(file),
            }
        });
        let tls = file.tls.as_ref().map(|tls| {
            let mut pem = |text: &Option<Text>, name: &str| {
                let text = text.as_ref().filter(|t| !t.is_empty())?;
                let file = PathBuf::from(text.as_str());
                match read_pem(&file) {
                    Ok(_) => Some(file),
                    Err(e) => {
                        let name = format!("{role}.tls.{name}");
                        self.refuse(Place::of(text), &name, Refused::File(e));
                        None
                    }
                }
            };
            let tls_value = Tls {
                ca_file: pem(&tls.ca_file, "ca_file"),
                cert_file: pem(&tls.cert_file, "cert_file"),
                key_file: pem(&tls.key_file, "key_file"),
            };
            let (cert, key) = (text(&tls.cert_file), text(&tls.key_file));
            match (cert, key) {
                (Some(cert), None) => {
                    let name = format!("{role}.tls.key_file");
                    self.refuse(Place::of(cert), &name, Refused::Needs("tls.key_file"));
                }
                (None, Some(key)) => {
                    let name = format!("{role}.tls.cert_file");
                    self.refuse(Place::of(key), &name, Refused::Needs("tls.cert_file"));
                }
                _ => {}
            }
            if kind == Kind::Redis && !url.starts_with("rediss://") {
                let name = format!("{role}.tls");
                let refused = Refused::File(
                    "needs a rediss:// url (TLS is built for one redis server; redis:// would \
                     send everything in clear)"
                        .into(),
                );
                self.refuse(Place::of(tls), &name, refused);
            }
            tls_value
        });
        Credentials {
            username,
            password,
            token,
            nkey_seed,
            creds_file,
            sentinel_username,
            sentinel_password,
            tls,
        }
    }

    /// A secret written in the file (`name`) or read from a file (`name_file`).
    fn secret(
        &mut self,
        value: &Option<Text>,
        from_file: &Option<Text>,
        role: &str,
        name: &'static str,
    ) -> Option<Secret> {
        let value = value.as_ref().filter(|t| !t.is_empty());
        let from_file = from_file.as_ref().filter(|t| !t.is_empty());
        match (value, from_file) {
            (None, None) => None,
            (Some(value), None) => Some(Secret::new(value.as_str())),
            (Some(_), Some(file)) => {
                self.refuse(
                    Place::of(file),
                    &format!("{role}.{name}"),
                    Refused::Twice(name),
                );
                None
            }
            (None, Some(file)) => match read_secret_file(std::path::Path::new(file.as_str())) {
                Ok(secret) => Some(secret),
                Err(e) => {
                    let path = format!("{role}.{name}_file");
                    self.refuse(Place::of(file), &path, Refused::File(e));
                    None
                }
            },
        }
    }

    /// `require_auth` at the top level or under `store:`/`bus:`: whether it is on for each.
    pub(super) fn require_auth(
        &mut self,
        file: &Spanned<File>,
        store: (&StoreSettings, &Credentials),
        bus: (&BusSettings, &Credentials),
    ) -> bool {
        let mut flag = |text: &Option<Text>, path: &str| {
            self.value(text, path, boolean)
                .map(|set| set.value)
                .unwrap_or(false)
        };
        let everywhere = flag(&file.require_auth, "require_auth");
        let on_store = match file.store.as_ref().map(|s| &s.require_auth) {
            Some(text) => flag(text, "store.require_auth"),
            None => false,
        };
        let on_bus = match file.bus.as_ref().map(|s| &s.require_auth) {
            Some(text) => flag(text, "bus.require_auth"),
            None => false,
        };
        let (store_kind, store_url) = kind_url_of_store(store.0);
        let (bus_kind, bus_url) = kind_url_of_bus(bus.0);
        let shares = bus_kind == store_kind && bus_url.is_some() && bus_url == store_url;
        let checks = [
            (
                "store",
                everywhere || on_store,
                store_kind,
                store_url,
                store.1,
                &file.store,
            ),
            // A bus on the store's connection is checked with the store, or not at all.
            (
                "bus",
                (everywhere || on_bus) && !(shares && (everywhere || on_store)),
                bus_kind,
                bus_url,
                bus.1,
                &file.bus,
            ),
        ];
        for (role, required, kind, url, credentials, section) in checks {
            let Some(url) = url.filter(|_| required) else {
                continue;
            };
            if url_has_secret(url) || credentials.authenticate() {
                continue;
            }
            let place = match section {
                Some(section) => section.url.as_ref().map_or(Place::of(section), Place::of),
                // Only a bus can be left out and still connect somewhere: the store's.
                None => file.store.as_ref().map_or(Place::default(), |s| {
                    s.url.as_ref().map_or(Place::of(s), Place::of)
                }),
            };
            let refused = Refused::NoIdentity {
                kind: kind.name(),
                role,
            };
            self.refuse(place, role, refused);
        }
        everywhere || on_store || on_bus
    }
}
