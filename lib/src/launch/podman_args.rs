//! The user's `podman run` options, as `terok-run run` receives them after `--`: find the
//! image, and refuse what terok manages or what would weaken the sandbox, in every spelling
//! podman accepts (`--flag value`, `--flag=value`, `-fvalue`, `-f=value`, bundled short
//! flags, `--mount`, `--tmpfs`).

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("no image given: terok-run run NAME [FLAGS] -- [PODMAN RUN OPTIONS] IMAGE [COMMAND…]")]
    NoImage,
    #[error("option {0} needs a value")]
    MissingValue(String),
    #[error("flag(s) managed by terok, cannot be passed to podman: {0}")]
    Managed(String),
    #[error("mount target(s) managed by terok, cannot be overridden: {0}")]
    ManagedMount(String),
    #[error(
        "--network {0} is refused while the shield is on: the container needs a network namespace of its own (bridge, a named network, slirp4netns, pasta or none), or pass --no-shield"
    )]
    Network(String),
    #[error(
        "--pod is refused while the shield is on: a pod shares one network namespace between containers; pass --no-shield"
    )]
    Pod,
}

/// Long options of `podman run` (4.x) that take a value.
const LONG_WITH_VALUE: &[&str] = &[
    "add-host",
    "annotation",
    "arch",
    "attach",
    "authfile",
    "blkio-weight",
    "blkio-weight-device",
    "cap-add",
    "cap-drop",
    "cgroup-conf",
    "cgroup-parent",
    "cgroupns",
    "cgroups",
    "chrootdirs",
    "cidfile",
    "conmon-pidfile",
    "cpu-period",
    "cpu-quota",
    "cpu-rt-period",
    "cpu-rt-runtime",
    "cpu-shares",
    "cpus",
    "cpuset-cpus",
    "cpuset-mems",
    "detach-keys",
    "device",
    "device-cgroup-rule",
    "device-read-bps",
    "device-read-iops",
    "device-write-bps",
    "device-write-iops",
    "dns",
    "dns-option",
    "dns-search",
    "entrypoint",
    "env",
    "env-file",
    "env-merge",
    "expose",
    "gidmap",
    "group-add",
    "health-cmd",
    "health-interval",
    "health-on-failure",
    "health-retries",
    "health-start-period",
    "health-timeout",
    "hooks-dir",
    "hostname",
    "hostuser",
    "image-volume",
    "init-path",
    "ip",
    "ip6",
    "ipc",
    "label",
    "label-file",
    "log-driver",
    "log-opt",
    "mac-address",
    "memory",
    "memory-reservation",
    "memory-swap",
    "memory-swappiness",
    "mount",
    "name",
    "net",
    "network",
    "network-alias",
    "oom-score-adj",
    "os",
    "passwd-entry",
    "personality",
    "pid",
    "pidfile",
    "pids-limit",
    "platform",
    "pod",
    "pod-id-file",
    "preserve-fds",
    "publish",
    "pull",
    "requires",
    "restart",
    "sdnotify",
    "seccomp-policy",
    "secret",
    "security-opt",
    "shm-size",
    "stop-signal",
    "stop-timeout",
    "subgidname",
    "subuidname",
    "sysctl",
    "systemd",
    "timeout",
    "tmpfs",
    "tz",
    "uidmap",
    "ulimit",
    "umask",
    "unsetenv",
    "user",
    "userns",
    "uts",
    "variant",
    "volume",
    "volumes-from",
    "workdir",
];

/// Short options of `podman run` that take a value, and their long names.
const SHORT_WITH_VALUE: &[(char, &str)] = &[
    ('a', "attach"),
    ('c', "cpu-shares"),
    ('e', "env"),
    ('h', "hostname"),
    ('l', "label"),
    ('m', "memory"),
    ('p', "publish"),
    ('u', "user"),
    ('v', "volume"),
    ('w', "workdir"),
];

/// Flags terok sets itself, or that would undo the sandbox.
const MANAGED: &[&str] = &[
    "name",
    "hooks-dir",
    "annotation",
    "cap-add",
    "cap-drop",
    "userns",
    "privileged",
    "security-opt",
];

/// Where terok mounts its runtime directory in the container.
pub const RUNTIME_MOUNT: &str = "/run/terok";

/// One option as podman will see it, under its long name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opt {
    pub name: String,
    pub value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    pub options: Vec<Opt>,
    pub image: String,
    pub command: Vec<String>,
}

impl RunArgs {
    pub fn value_of(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|o| o.name == name)
            .and_then(|o| o.value.as_deref())
    }
}

/// Parse `[OPTIONS] IMAGE [COMMAND…]` the way podman does.
pub fn parse(args: &[String]) -> Result<RunArgs, ArgsError> {
    let mut options = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" {
            i += 1;
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (long, None),
            };
            let name = if name == "net" { "network" } else { name };
            let value = if inline.is_some() || !LONG_WITH_VALUE.contains(&name) {
                inline
            } else {
                i += 1;
                Some(
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| ArgsError::MissingValue(arg.clone()))?,
                )
            };
            options.push(Opt {
                name: name.to_owned(),
                value,
            });
        } else if let Some(shorts) = arg.strip_prefix('-').filter(|s| !s.is_empty()) {
            for (pos, c) in shorts.char_indices() {
                if let Some((_, long)) = SHORT_WITH_VALUE.iter().find(|(s, _)| *s == c) {
                    let rest = &shorts[pos + c.len_utf8()..];
                    let value = if rest.is_empty() {
                        i += 1;
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| ArgsError::MissingValue(arg.clone()))?
                    } else {
                        rest.strip_prefix('=').unwrap_or(rest).to_owned()
                    };
                    options.push(Opt {
                        name: (*long).to_owned(),
                        value: Some(value),
                    });
                    break;
                }
                options.push(Opt {
                    name: c.to_string(),
                    value: None,
                });
            }
        } else {
            break;
        }
        i += 1;
    }
    let image = args.get(i).cloned().ok_or(ArgsError::NoImage)?;
    Ok(RunArgs {
        options,
        image,
        command: args[i + 1..].to_vec(),
    })
}

/// Normalise a container path: no `.`, no `..`, no repeated or trailing slashes.
fn normalise(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

fn is_managed_target(target: &str) -> bool {
    let t = normalise(target);
    // /var/run is a symlink to /run in most images.
    ["/run/terok", "/var/run/terok"]
        .iter()
        .any(|m| t == *m || t.starts_with(&format!("{m}/")))
        || t == "/" // a mount over the root would hide ours too
}

/// The container-side target of a mount option, if it has one.
fn mount_target(opt: &Opt) -> Option<String> {
    let value = opt.value.as_deref()?;
    match opt.name.as_str() {
        "volume" => value.split(':').nth(1).map(str::to_owned),
        "tmpfs" => value.split(':').next().map(str::to_owned),
        "mount" => value.split(',').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            matches!(k.trim(), "target" | "dst" | "destination").then(|| v.trim().to_owned())
        }),
        _ => None,
    }
}

/// Network modes that give the container a network namespace of its own.
fn own_netns(mode: &str) -> bool {
    let kind = mode.split(':').next().unwrap_or("");
    match kind {
        "bridge" | "slirp4netns" | "pasta" | "none" | "private" => true,
        "host" | "container" | "ns" => false,
        // Anything else is the name of a podman network (possibly several, comma separated).
        name => !name.is_empty() && !mode.contains(':'),
    }
}

/// Refuse what terok manages or what would defeat the shield.
pub fn check(args: &RunArgs, shield: bool) -> Result<(), ArgsError> {
    let mut managed: Vec<String> = args
        .options
        .iter()
        .filter(|o| MANAGED.contains(&o.name.as_str()))
        .map(|o| format!("--{}", o.name))
        .collect();
    managed.sort();
    managed.dedup();
    if !managed.is_empty() {
        return Err(ArgsError::Managed(managed.join(", ")));
    }
    let mut targets: Vec<String> = args
        .options
        .iter()
        .filter_map(mount_target)
        .filter(|t| is_managed_target(t))
        .collect();
    targets.sort();
    targets.dedup();
    if !targets.is_empty() {
        return Err(ArgsError::ManagedMount(targets.join(", ")));
    }
    if shield {
        for opt in &args.options {
            match opt.name.as_str() {
                "network" => {
                    let mode = opt.value.clone().unwrap_or_default();
                    if !own_netns(&mode) {
                        return Err(ArgsError::Network(mode));
                    }
                }
                "pod" => return Err(ArgsError::Pod),
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    fn checked(args: &[&str]) -> Result<RunArgs, ArgsError> {
        let parsed = parse(&v(args))?;
        check(&parsed, true)?;
        Ok(parsed)
    }

    #[test]
    fn finds_the_image_after_options() {
        let a = parse(&v(&[
            "-it",
            "--rm",
            "-e",
            "A=1",
            "--env=B=2",
            "-vX:/y",
            "--pull",
            "never",
            "img:1",
            "sh",
            "-c",
            "x",
        ]))
        .unwrap();
        assert_eq!(a.image, "img:1");
        assert_eq!(a.command, v(&["sh", "-c", "x"]));
        assert_eq!(a.value_of("pull"), Some("never"));
        assert_eq!(a.value_of("volume"), Some("X:/y"));
        assert_eq!(parse(&v(&["--rm"])), Err(ArgsError::NoImage));
        assert_eq!(parse(&[]), Err(ArgsError::NoImage));
        assert!(matches!(
            parse(&v(&["-e"])),
            Err(ArgsError::MissingValue(_))
        ));
    }

    #[test]
    fn managed_flags_in_every_spelling() {
        for args in [
            &["--name", "x", "img"][..],
            &["--name=x", "img"],
            &["--annotation", "a=b", "img"],
            &["--cap-add=NET_ADMIN", "img"],
            &["--cap-drop", "ALL", "img"],
            &["--userns=host", "img"],
            &["--privileged", "img"],
            &["--security-opt", "seccomp=unconfined", "img"],
            &["--hooks-dir=/x", "img"],
        ] {
            assert!(
                matches!(checked(args), Err(ArgsError::Managed(_))),
                "{args:?}"
            );
        }
    }

    #[test]
    fn managed_mounts_in_every_spelling() {
        for args in [
            &["-v", "/h:/run/terok", "img"][..],
            &["-v/h:/run/terok/x:ro", "img"],
            &["-itv/h:/run/terok", "img"],
            &["-v=/h:/run/terok", "img"],
            &["--volume=/h:/run//terok/", "img"],
            &["--volume", "/h:/run/./terok", "img"],
            &["--volume", "/h:/var/run/terok", "img"],
            &["--mount", "type=bind,src=/h,target=/run/terok", "img"],
            &["--mount=type=tmpfs,dst=/run/terok/a", "img"],
            &["--tmpfs", "/run/terok:rw", "img"],
        ] {
            assert!(
                matches!(checked(args), Err(ArgsError::ManagedMount(_))),
                "{args:?}"
            );
        }
        assert!(checked(&["-v", "/h:/data", "--tmpfs", "/tmp", "-v", "noColon", "img"]).is_ok());
        assert!(checked(&["-v", "/h:/run/terokx", "img"]).is_ok());
    }

    #[test]
    fn networks_without_an_own_namespace_are_refused_with_the_shield() {
        for mode in ["host", "container:abc", "ns:/run/netns/x"] {
            for args in [vec!["--network", mode, "img"], vec!["--net", mode, "img"]] {
                assert!(
                    matches!(checked(&args), Err(ArgsError::Network(_))),
                    "{args:?}"
                );
            }
            let inline = format!("--network={mode}");
            assert!(matches!(
                checked(&[&inline, "img"]),
                Err(ArgsError::Network(_))
            ));
            let parsed = parse(&v(&["--network", mode, "img"])).unwrap();
            assert!(check(&parsed, false).is_ok());
        }
        for mode in [
            "bridge",
            "mynet",
            "slirp4netns:allow_host_loopback=false",
            "pasta",
            "none",
            "private",
        ] {
            assert!(checked(&["--network", mode, "img"]).is_ok(), "{mode}");
        }
        assert_eq!(checked(&["--pod", "p", "img"]), Err(ArgsError::Pod));
    }
}
