//! The fleet packaging stays in step with the binary: the DaemonSet's deploy config is a valid
//! deploy config, its command line names files the image provides, and the image is built from
//! scratch. (The manifest's schema is checked by `kubernetes-validate` in CI, the image is built
//! and smoke-tested there by dist/container/build.sh and smoke.sh.)

use std::path::Path;

use moderato_agent::deploy::DeployConfig;
use moderato_env::live::Role;

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The `deploy.toml: |` block of the ConfigMap, de-indented.
fn configmap_deploy_toml(yaml: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "deploy.toml: |").skip(1);
    let first = lines.next().expect("the ConfigMap holds deploy.toml");
    let indent = first.len() - first.trim_start().len();
    std::iter::once(first)
        .chain(lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent))
        .map(|l| if l.len() >= indent { &l[indent..] } else { "" })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_daemonset_deploy_config_is_a_valid_deploy_config() {
    let yaml = read("dist/kubernetes/moderato.yaml");
    let toml = configmap_deploy_toml(&yaml);
    assert!(toml.contains("[limits.nic]"), "{toml}");
    let path = Path::new("dist/kubernetes/moderato.yaml#deploy.toml");
    let cfg = DeployConfig::parse(&toml, path).unwrap_or_else(|e| panic!("{e:#}"));
    let role = cfg.role(Some(Role::Host), path).unwrap();
    cfg.limits(role, path).unwrap();
}

#[test]
fn the_daemonset_runs_what_the_image_holds() {
    let yaml = read("dist/kubernetes/moderato.yaml");
    for needed in [
        "hostNetwork: true",
        "readOnlyRootFilesystem: true",
        "- NET_ADMIN",
        "- ALL",
        "containerPort: 9464",
        "livenessProbe:",
        "- 0.0.0.0:9464",
        "mountPath: /etc/moderato",
        "mountPath: /var/lib/moderato/model",
        "- /etc/moderato/deploy.toml",
        "- /var/lib/moderato/model",
    ] {
        assert!(yaml.contains(needed), "dist/kubernetes/moderato.yaml lacks `{needed}`");
    }
    let build = read("dist/container/build.sh");
    for dir in ["/etc/moderato", "/var/lib/moderato/model", "/run/moderato"] {
        assert!(build.contains(dir), "build.sh does not create the mount point {dir}");
    }
    let cf = read("dist/container/Containerfile");
    let from: Vec<&str> = cf.lines().filter(|l| l.trim_start().starts_with("FROM")).collect();
    assert_eq!(from, ["FROM scratch"], "the image must not pull a base image from a registry");
}
