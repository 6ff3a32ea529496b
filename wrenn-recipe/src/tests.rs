use super::*;
use proptest::prelude::*;

#[test]
fn every_instruction_parses() {
    let steps = parse_steps(&[
        "RUN echo hi",
        "RUN --timeout=2m apt-get install -y jq",
        "RUN --user=root --timeout=5s id -u",
        "ENV A=1 B=\"two words\"",
        "WORKDIR /srv/app",
        "USER user",
        "COPY app.py conf/ /srv/app/",
        "COPY --chown=user --chmod=0755 run.sh /usr/local/bin/run",
        "START python3 -m http.server 8000",
    ])
    .unwrap();
    assert_eq!(
        steps,
        vec![
            Step::Run {
                cmd: "echo hi".into(),
                timeout: DEFAULT_STEP_TIMEOUT,
                user: None,
            },
            Step::Run {
                cmd: "apt-get install -y jq".into(),
                timeout: Duration::from_secs(120),
                user: None,
            },
            Step::Run {
                cmd: "id -u".into(),
                timeout: Duration::from_secs(5),
                user: Some("root".into()),
            },
            Step::Env {
                vars: vec![("A".into(), "1".into()), ("B".into(), "two words".into())]
            },
            Step::Workdir {
                path: "/srv/app".into()
            },
            Step::User {
                name: "user".into()
            },
            Step::Copy {
                srcs: vec!["app.py".into(), "conf/".into()],
                dst: "/srv/app/".into(),
                owner: None,
                mode: None,
            },
            Step::Copy {
                srcs: vec!["run.sh".into()],
                dst: "/usr/local/bin/run".into(),
                owner: Some("user".into()),
                mode: Some(0o755),
            },
            Step::Start {
                cmd: "python3 -m http.server 8000".into()
            },
        ]
    );
}

#[test]
fn bad_steps_name_their_line() {
    let bad = |lines: &[&str]| parse_steps(lines).unwrap_err();
    assert_eq!(bad(&["RUN true", "FETCH x"]).line, 2);
    assert!(bad(&["RUN"]).message.contains("needs a command"));
    assert!(bad(&["RUN --timeout=0s true"]).message.contains("between"));
    assert!(bad(&["RUN --timeout=soon true"])
        .message
        .contains("invalid duration"));
    assert!(bad(&["RUN --retries=2 true"]).message.contains("no option"));
    assert!(bad(&["ENV 1A=x"]).message.contains("invalid environment"));
    assert!(bad(&["ENV A"]).message.contains("KEY=value"));
    assert!(bad(&["USER root;rm"]).message.contains("invalid user"));
    assert!(bad(&["RUN --user=a;b true"])
        .message
        .contains("invalid user"));
    assert!(bad(&["COPY --chmod=999 a /b"]).message.contains("octal"));
    assert!(bad(&["COPY --chown=x/y a /b"])
        .message
        .contains("invalid user"));
    assert!(bad(&["COPY --owner=x a /b"]).message.contains("no option"));
    assert!(bad(&["COPY onlyone"])
        .message
        .contains("source and a destination"));
    assert!(bad(&["COPY ../etc/passwd /x"])
        .message
        .contains("relative path"));
    assert!(bad(&["COPY /etc/passwd /x"])
        .message
        .contains("relative path"));
    assert!(bad(&[""]).message.contains("empty"));
}

#[test]
fn healthchecks() {
    let hc = parse_healthcheck("--interval=1s --retries=5 --port=8000").unwrap();
    assert_eq!(hc.check, Check::Port { port: 8000 });
    assert_eq!(hc.interval, Duration::from_secs(1));
    assert_eq!(hc.retries, 5);
    let hc = parse_healthcheck("curl -sf localhost:8000").unwrap();
    assert_eq!(
        hc.check,
        Check::Command {
            cmd: "curl -sf localhost:8000".into()
        }
    );
    assert_eq!(hc.timeout, Duration::from_secs(10));
    assert!(parse_healthcheck("").is_err());
    assert!(parse_healthcheck("--port=0").is_err());
    assert!(parse_healthcheck("--port=80 true").is_err());
    assert!(parse_healthcheck("--interval=0 true").is_err());
    assert!(parse_healthcheck("--colour=red true").is_err());
}

#[test]
fn recipe_files() {
    let f = parse_file(
        "# a web app\nFROM python\n\nRUN pip install \\\n    flask\nENV PORT=8000\n\
         START python3 app.py\nHEALTHCHECK --interval=1s --port=8000\n",
    )
    .unwrap();
    assert_eq!(f.base.as_deref(), Some("python"));
    assert_eq!(
        f.lines,
        [
            "RUN pip install      flask",
            "ENV PORT=8000",
            "START python3 app.py"
        ]
    );
    assert_eq!(f.healthcheck.unwrap().check, Check::Port { port: 8000 });
    assert_eq!(
        f.healthcheck_line.as_deref(),
        Some("--interval=1s --port=8000")
    );
    assert_eq!(parse_file("RUN true\nFROM x\n").unwrap_err().line, 2);
    assert_eq!(parse_file("FROM a b\n").unwrap_err().line, 1);
    assert_eq!(parse_file("RUN a \\\n").unwrap_err().line, 1);
    assert_eq!(parse_file("\n\nBOGUS\n").unwrap_err().line, 3);
}

#[test]
fn copy_sources_cover_files_and_directories() {
    assert_eq!(copy_relative("a.txt", "a.txt"), Some(""));
    assert_eq!(copy_relative("app/", "app/bin/run.sh"), Some("bin/run.sh"));
    assert_eq!(copy_relative("app", "app/x"), Some("x"));
    assert_eq!(copy_relative("app", "apple/x"), None);
    assert_eq!(copy_relative("app/x", "app"), None);
    assert_eq!(copy_relative(".", "any/file"), Some("any/file"));
    assert_eq!(copy_relative("./", "f"), Some("f"));
}

#[test]
fn paths_resolve_against_the_workdir() {
    assert_eq!(resolve("/srv/", "a/b"), "/srv/a/b");
    assert_eq!(resolve("/srv", "/etc"), "/etc");
}

proptest! {
    #[test]
    fn the_parsers_never_panic(s in "\\PC{0,200}") {
        let _ = parse_file(&s);
        let _ = parse_step(1, &s);
        let _ = parse_healthcheck(&s);
    }

    #[test]
    fn run_keeps_its_command(cmd in "[a-z][a-z0-9 ;|&$]{0,60}") {
        let cmd = cmd.trim().to_string();
        prop_assume!(!cmd.is_empty());
        let step = parse_step(1, &format!("RUN {cmd}")).unwrap();
        prop_assert_eq!(step, Step::Run { cmd, timeout: DEFAULT_STEP_TIMEOUT, user: None });
    }
}
