//! A subcommand's options as a table of keys, so that a config file's entry is read by the
//! same clap definitions as the command line: an option is declared once, on its struct,
//! and means the same in a file and in a flag (same parser, same default, same checks).
//!
//! A key is an option's id (its field name, snake_case). The options of a flattened struct
//! with `#[group(id = NAME)]`, NAME one of the tables given to [`Options::new`], are keys
//! of the table NAME (`[jobs.filter]`). A switch takes `true` or `false`, a repeatable
//! option a list, any other option a string or a number. The command line and the
//! environment override a file's entry key by key ([`Options::overlay`]; precedence:
//! defaults < file < environment < flags).

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use toml::{Table, Value};

/// The options of one subcommand, as keys.
#[derive(Debug, Clone)]
pub struct Options {
    cmd: Command,
    tables: &'static [&'static str],
    /// Options of the command line only (`--config`, `--host`, …), never keys of a file.
    cli_only: &'static [&'static str],
}

impl Options {
    /// The options of `cmd` (built from a `#[derive(Parser)]`); the groups named in
    /// `tables` are tables of keys.
    pub fn new(
        cmd: Command,
        tables: &'static [&'static str],
        cli_only: &'static [&'static str],
    ) -> Self {
        // An entry is read as written: the environment has had its say in `overlay`.
        let mut cmd = cmd.mut_args(|a| a.env(None));
        cmd.build();
        Options {
            cmd,
            tables,
            cli_only,
        }
    }

    /// The table an option's key lives in (`None`: the entry itself).
    fn table_of(&self, id: &str) -> Option<&'static str> {
        self.tables.iter().copied().find(|t| {
            self.cmd
                .get_groups()
                .find(|g| g.get_id() == *t)
                .is_some_and(|g| g.get_args().any(|a| a == id))
        })
    }

    /// The option that `key` of `table` means.
    fn arg(&self, table: Option<&str>, key: &str) -> Option<&Arg> {
        self.cmd
            .get_arguments()
            .find(|a| a.get_id() == key && self.table_of(key) == table)
    }

    /// The keys a file may set in `table` (`None`: the entry), for messages.
    pub fn keys(&self, table: Option<&str>) -> Vec<String> {
        let mut keys: Vec<String> = self
            .cmd
            .get_arguments()
            .filter(|a| !self.is_cli_only(a) && self.table_of(a.get_id().as_str()) == table)
            .map(|a| a.get_id().to_string())
            .collect();
        if table.is_none() {
            keys.extend(self.tables.iter().map(|t| t.to_string()));
        }
        keys.sort();
        keys
    }

    fn is_cli_only(&self, arg: &Arg) -> bool {
        let id = arg.get_id().as_str();
        self.cli_only.contains(&id) || id == "help" || id == "version"
    }

    /// Checks every key of `entry` names an option a file may set, with a value of the
    /// right kind. The message names the key (and the nearest known one).
    pub fn check(&self, entry: &Table) -> Result<(), String> {
        for (key, value) in entry {
            match (self.tables.contains(&key.as_str()), value) {
                (true, Value::Table(t)) => {
                    for (k, v) in t {
                        self.check_key(Some(key), k, v)?;
                    }
                }
                (true, _) => return Err(format!("`{key}` is a table ([…{key}])")),
                (false, v) => self.check_key(None, key, v)?,
            }
        }
        Ok(())
    }

    fn check_key(&self, table: Option<&str>, key: &str, value: &Value) -> Result<(), String> {
        let at = path(table, key);
        let Some(arg) = self.arg(table, key).filter(|a| !self.is_cli_only(a)) else {
            let known = self.keys(table);
            let hint = match nearest(key, &known) {
                Some(k) => format!(" (did you mean `{}`?)", path(table, k)),
                None => String::new(),
            };
            return Err(format!(
                "unknown key `{at}`{hint}; known keys{}: {}",
                table.map(|t| format!(" of [{t}]")).unwrap_or_default(),
                known.join(", ")
            ));
        };
        values(arg, value)
            .map(|_| ())
            .map_err(|e| format!("`{at}`: {e}"))
    }

    /// Sets in `entry` every option that the command line or the environment gave in
    /// `matches` (a file's values for them are replaced, lists too).
    pub fn overlay(&self, entry: &mut Table, matches: &ArgMatches) {
        for arg in self.cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if self.is_cli_only(arg)
                || !matches!(
                    matches.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            {
                continue;
            }
            let value = if takes_no_value(arg) {
                Value::Boolean(true)
            } else {
                let raw: Vec<Value> = matches
                    .get_raw(id)
                    .into_iter()
                    .flatten()
                    .map(|v| Value::String(v.to_string_lossy().into_owned()))
                    .collect();
                match (repeatable(arg), raw.len()) {
                    (false, 1) => raw.into_iter().next().unwrap_or(Value::Boolean(true)),
                    _ => Value::Array(raw),
                }
            };
            let into = match self.table_of(id) {
                Some(t) => match entry.entry(t).or_insert_with(|| Value::Table(Table::new())) {
                    Value::Table(t) => t,
                    _ => continue,
                },
                None => &mut *entry,
            };
            into.insert(id.to_owned(), value);
        }
    }

    /// The command line `entry` stands for (positionals first).
    pub fn argv(&self, entry: &Table) -> Result<Vec<String>, String> {
        let mut positional: Vec<(usize, Vec<String>)> = Vec::new();
        // By declaration order, so that the command line reads like the help.
        let mut flags: Vec<(usize, Vec<String>)> = Vec::new();
        let mut add = |table: Option<&str>, key: &str, value: &Value| -> Result<(), String> {
            let arg = self
                .arg(table, key)
                .ok_or_else(|| format!("unknown key `{}`", path(table, key)))?;
            let values = values(arg, value).map_err(|e| format!("`{}`: {e}", path(table, key)))?;
            let order = self
                .cmd
                .get_arguments()
                .position(|a| a.get_id() == arg.get_id())
                .unwrap_or(usize::MAX);
            match (arg.get_index(), arg.get_long()) {
                (Some(i), _) => positional.push((i, values)),
                (None, Some(long)) if takes_no_value(arg) => {
                    if values.iter().any(|v| v == "true") {
                        flags.push((order, vec![format!("--{long}")]));
                    }
                }
                (None, Some(long)) => {
                    // `--long=-x`: a value that starts with `-` is not taken for a flag.
                    let words = values
                        .into_iter()
                        .flat_map(|v| match v.starts_with('-') {
                            true => vec![format!("--{long}={v}")],
                            false => vec![format!("--{long}"), v],
                        })
                        .collect();
                    flags.push((order, words));
                }
                (None, None) => return Err(format!("`{}` has no flag", path(table, key))),
            }
            Ok(())
        };
        for (key, value) in entry {
            match (self.tables.contains(&key.as_str()), value) {
                (true, Value::Table(t)) => {
                    for (k, v) in t {
                        add(Some(key), k, v)?;
                    }
                }
                _ => add(None, key, value)?,
            }
        }
        positional.sort_by_key(|(i, _)| *i);
        flags.sort_by_key(|(order, _)| *order);
        let flags = flags.into_iter().flat_map(|(_, words)| words);
        let positional: Vec<String> = positional.into_iter().flat_map(|(_, v)| v).collect();
        // Positionals after `--` if one could pass for a flag (ZFS names cannot).
        Ok(match positional.iter().any(|p| p.starts_with('-')) {
            true => flags.chain(["--".to_owned()]).chain(positional).collect(),
            false => positional.into_iter().chain(flags).collect(),
        })
    }

    /// Parses `entry` as the command line it stands for into `T`. A clap error names the
    /// key of the option it is about.
    pub fn parse<T: clap::FromArgMatches>(&self, entry: &Table) -> Result<T, String> {
        let argv = self.argv(entry)?;
        let matches = self
            .cmd
            .clone()
            .no_binary_name(true)
            .try_get_matches_from(&argv)
            .map_err(|e| self.name_key(&e))?;
        T::from_arg_matches(&matches).map_err(|e| self.name_key(&e))
    }

    /// clap's message, with the key of the option it names (`--every <DURATION>`).
    fn name_key(&self, e: &clap::Error) -> String {
        let message = crate::clap_message(e);
        let flag = match e.get(clap::error::ContextKind::InvalidArg) {
            Some(clap::error::ContextValue::String(s)) => s.clone(),
            _ => return message,
        };
        let name = flag.split([' ', '=']).next().unwrap_or_default();
        let arg = self.cmd.get_arguments().find(|a| {
            a.get_long().is_some_and(|l| name == format!("--{l}"))
                || a.get_value_names().is_some_and(|v| {
                    v.iter()
                        .any(|v| name.trim_matches(['[', ']', '<', '>']) == v.as_str())
                })
        });
        match arg {
            Some(a) if !self.is_cli_only(a) => {
                let id = a.get_id().as_str();
                format!("`{}`: {message}", path(self.table_of(id), id))
            }
            _ => message,
        }
    }
}

/// Whether `arg` is a switch (`--recursive`): `true` or `false` in a file.
fn takes_no_value(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
}

/// Whether `arg` may be given several times: a list in a file.
fn repeatable(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
}

/// The command-line values `value` stands for as `arg`'s, or what kind it should be.
fn values(arg: &Arg, value: &Value) -> Result<Vec<String>, String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        other => Err(format!(
            "expected a string or a number, not {}",
            other.type_str()
        )),
    };
    if takes_no_value(arg) {
        return match value {
            Value::Boolean(b) => Ok(vec![b.to_string()]),
            other => Err(format!("expected true or false, not {}", other.type_str())),
        };
    }
    match (repeatable(arg), value) {
        (true, Value::Array(items)) => items.iter().map(scalar).collect(),
        (true, other) => Err(format!("expected a list, not {}", other.type_str())),
        (false, v) => Ok(vec![scalar(v)?]),
    }
}

/// `table.key`, or `key` at the top.
fn path(table: Option<&str>, key: &str) -> String {
    match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    }
}

/// The known key nearest to a misspelt one, if any is near.
fn nearest<'a>(key: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k.as_str())
}

/// Levenshtein distance (keys are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, CommandFactory, Parser};

    #[derive(Args, Debug, Clone)]
    #[group(id = "limits")]
    struct Limits {
        /// Most steps.
        #[arg(long = "max-steps", default_value_t = 4)]
        steps: u16,
    }

    #[derive(Parser, Debug)]
    #[command(no_binary_name = true)]
    struct Demo {
        source: Option<String>,
        #[arg(long, env = "ZQ_TEST_OPTIONS_ZFS", default_value = "zfs")]
        zfs: String,
        #[arg(long)]
        recursive: bool,
        #[arg(long)]
        exclude: Vec<String>,
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=16))]
        connections: Option<u8>,
        #[arg(long)]
        config: Option<String>,
        #[arg(long, env = "ZQ_TEST_OPTIONS_HOST", requires = "config")]
        host: Option<String>,
        #[command(flatten)]
        limits: Limits,
    }

    fn options() -> Options {
        Options::new(Demo::command(), &["limits"], &["config", "host"])
    }

    fn table(text: &str) -> Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn an_entry_parses_like_its_command_line() {
        let entry = table(
            "source = \"t/a\"\nrecursive = true\nexclude = [\"x\", \"y\"]\nconnections = 4\n\
             [limits]\nsteps = 8\n",
        );
        let o = options();
        o.check(&entry).unwrap();
        assert_eq!(
            o.argv(&entry).unwrap().join(" "),
            "t/a --recursive --exclude x --exclude y --connections 4 --max-steps 8"
        );
        let d: Demo = o.parse(&entry).unwrap();
        assert_eq!(d.source.as_deref(), Some("t/a"));
        assert!(d.recursive);
        assert_eq!(d.exclude, ["x", "y"]);
        assert_eq!((d.connections, d.limits.steps), (Some(4), 8));
        // Defaults come from the same definitions.
        let d: Demo = o.parse(&Table::new()).unwrap();
        assert_eq!((d.zfs.as_str(), d.limits.steps), ("zfs", 4));
    }

    #[test]
    fn values_that_look_like_flags_stay_values() {
        let entry = table("source = \"-s\"\nexclude = [\"-x\", \"y\"]\nzfs = \"--help\"\n");
        let o = options();
        assert_eq!(
            o.argv(&entry).unwrap().join(" "),
            "--zfs=--help --exclude=-x --exclude y -- -s"
        );
        let d: Demo = o.parse(&entry).unwrap();
        assert_eq!(d.source.as_deref(), Some("-s"));
        assert_eq!(d.exclude, ["-x", "y"]);
        assert_eq!(d.zfs, "--help");
    }

    #[test]
    fn wrong_keys_and_kinds_are_named() {
        let o = options();
        let err = |text: &str| o.check(&table(text)).unwrap_err();
        let e = err("recursve = true\n");
        assert!(
            e.contains("unknown key `recursve` (did you mean `recursive`?)"),
            "{e}"
        );
        assert!(err("config = \"x\"\n").contains("unknown key `config`"));
        assert!(err("steps = 1\n").contains("unknown key `steps`"));
        assert!(err("[limits]\nstep = 1\n").contains("did you mean `limits.steps`"));
        assert!(err("recursive = \"yes\"\n").contains("`recursive`: expected true or false"));
        assert!(err("exclude = \"x\"\n").contains("`exclude`: expected a list"));
        assert!(err("zfs = true\n").contains("`zfs`: expected a string or a number"));
        assert!(err("limits = 3\n").contains("`limits` is a table"));
        let e = o.parse::<Demo>(&table("connections = 40\n")).unwrap_err();
        assert!(e.starts_with("`connections`: invalid value '40'"), "{e}");
        let e = o
            .parse::<Demo>(&table("[limits]\nsteps = \"many\"\n"))
            .unwrap_err();
        assert!(e.starts_with("`limits.steps`: invalid value 'many'"), "{e}");
    }

    #[test]
    fn the_command_line_and_the_environment_override_the_file_key_by_key() {
        let o = options();
        let mut entry = table(
            "source = \"t/a\"\nzfs = \"/file/zfs\"\nexclude = [\"x\"]\n[limits]\nsteps = 8\n",
        );
        let matches = Demo::command()
            .try_get_matches_from(["--exclude", "y", "--max-steps", "2", "--config", "f"])
            .unwrap();
        o.overlay(&mut entry, &matches);
        let d: Demo = o.parse(&entry).unwrap();
        // Flags replace the file's list and table key; --config stays on the command line.
        assert_eq!(d.exclude, ["y"]);
        assert_eq!(d.limits.steps, 2);
        assert_eq!(d.zfs, "/file/zfs");
        assert!(d.config.is_none());
    }

    /// Regression: ZQ_HOST in the environment of `zq-send run --config` made every
    /// receiver entry fail ("required arguments were not provided: --config"): clap read
    /// it again while parsing the entry, where `--host` requires `--config`.
    #[test]
    fn an_entry_is_parsed_without_the_environment() {
        // Only this test sets it; the others parse entries, which ignore it now.
        std::env::set_var("ZQ_TEST_OPTIONS_HOST", "src");
        let d: Demo = options().parse(&table("source = \"t/a\"\n")).unwrap();
        assert_eq!(d.host, None);
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("evry", "every"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(nearest("xyz", &["every".into()]), None);
    }
}
