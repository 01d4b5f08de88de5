//! Args -> Config, and the errors that name the fix.
use clap::Parser;

use super::*;

fn parse(args: &[&str]) -> Result<Config, ConfigError> {
    Config::try_from(
        Args::try_parse_from(std::iter::once("airlock").chain(args.iter().copied())).unwrap(),
    )
}

#[test]
fn socket_path_and_edu_make_a_serve_config() {
    assert_eq!(
        parse(&["--socket-path", "/tmp/a.sock", "--emulate", "edu"]),
        Ok(Config::Serve {
            listen: Listen::Path("/tmp/a.sock".into()),
            access: SocketAccess::default(),
            device: DeviceKind::Emulated(EmulatedKind::Edu),
            max_data_xfer: 1 << 20,
            poll_us: 0,
            sandbox: Some(SandboxConfig {
                user: None,
                memlock: None,
                fault: None
            }),
            windows: vec![],
        })
    );
}

#[test]
fn device_names_edu_or_a_pci_address() {
    let dev = |d: &str| match parse(&["--fd", "3", "--device", d]) {
        Ok(Config::Serve { device, .. }) => Ok(device),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e),
    };
    assert_eq!(dev("edu"), Ok(DeviceKind::Emulated(EmulatedKind::Edu)));
    assert!(matches!(dev("03:00.0"), Ok(DeviceKind::Vfio { bdf, .. }) if bdf == "0000:03:00.0"));
    assert!(matches!(dev("nic0"), Err(ConfigError::BadAddress(_))));
}

#[test]
fn poll_us_is_off_by_default_and_bounded_to_a_second() {
    let poll = |extra: &[&str]| {
        let args = [&["--fd", "3", "--emulate", "edu"], extra].concat();
        Args::try_parse_from(std::iter::once("airlock").chain(args)).map(
            |a| match Config::try_from(a) {
                Ok(Config::Serve { poll_us, .. }) => poll_us,
                other => panic!("{other:?}"),
            },
        )
    };
    assert_eq!(poll(&[]).unwrap(), 0);
    assert_eq!(poll(&["--poll-us", "50"]).unwrap(), 50);
    assert!(poll(&["--poll-us", "1000001"]).is_err());
    assert!(poll(&["--poll-us", "-1"]).is_err());
}

#[test]
fn both_or_neither_listen_option_is_refused() {
    assert_eq!(parse(&["--emulate", "edu"]), Err(ConfigError::Listen));
    assert_eq!(
        parse(&["--socket-path", "/x", "--fd", "3", "--emulate", "edu"]),
        Err(ConfigError::Listen)
    );
}

#[test]
fn stdio_fds_are_refused() {
    assert_eq!(
        parse(&["--fd", "1", "--emulate", "edu"]),
        Err(ConfigError::BadFd(1))
    );
}

#[test]
fn a_device_is_required() {
    assert_eq!(parse(&["--socket-path", "/x"]), Err(ConfigError::NoDevice));
}

#[test]
fn vfio_takes_a_pci_address_with_or_without_domain() {
    assert_eq!(
        parse(&["--socket-path", "/x", "--vfio", "00:04.0", "--mediate-bars"]),
        Ok(Config::Serve {
            listen: Listen::Path("/x".into()),
            access: SocketAccess::default(),
            device: DeviceKind::Vfio {
                bdf: "0000:00:04.0".into(),
                mediate_bars: true,
                allow_unsafe_interrupts: false,
            },
            max_data_xfer: 1 << 20,
            poll_us: 0,
            sandbox: Some(SandboxConfig {
                user: None,
                memlock: None,
                fault: None
            }),
            windows: vec![],
        })
    );
    assert_eq!(
        parse(&["--socket-path", "/x", "--vfio", "0000:00:04"]),
        Err(ConfigError::BadAddress("0000:00:04".into()))
    );
    assert_eq!(
        parse(&["--socket-path", "/x", "--vfio", "0000:0g:04.0"]),
        Err(ConfigError::BadAddress("0000:0g:04.0".into()))
    );
}

#[test]
fn sandbox_is_on_by_default_and_user_needs_it() {
    let Ok(Config::Serve { sandbox, .. }) = parse(&[
        "--socket-path",
        "/x",
        "--emulate",
        "edu",
        "--user",
        "1000:100",
    ]) else {
        panic!("serve config expected")
    };
    assert_eq!(sandbox.unwrap().user, Some((1000, 100)));
    assert_eq!(
        parse(&[
            "--socket-path",
            "/x",
            "--emulate",
            "edu",
            "--sandbox",
            "off",
            "--user",
            "1:1"
        ]),
        Err(ConfigError::UserWithoutSandbox)
    );
    assert_eq!(
        parse(&["--socket-path", "/x", "--emulate", "edu", "--user", "bob"]),
        Err(ConfigError::BadUser("bob".into()))
    );
    let Ok(Config::Serve { sandbox, .. }) = parse(&[
        "--socket-path",
        "/x",
        "--emulate",
        "edu",
        "--sandbox",
        "off",
    ]) else {
        panic!("serve config expected")
    };
    assert!(sandbox.is_none());
}

#[test]
fn print_capabilities_needs_nothing_else() {
    assert_eq!(
        parse(&["--print-capabilities"]),
        Ok(Config::PrintCapabilities)
    );
}

#[test]
fn socket_group_and_mode_shape_the_socket_airlock_creates() {
    let Ok(Config::Serve { access, .. }) = parse(&[
        "--socket-path",
        "/x",
        "--emulate",
        "edu",
        "--socket-group",
        "0",
    ]) else {
        panic!("a group with --socket-path serves");
    };
    assert_eq!(access.mode, 0o660);
    assert!(
        Args::try_parse_from([
            "airlock",
            "--fd",
            "3",
            "--emulate",
            "edu",
            "--socket-mode",
            "0600"
        ])
        .is_err(),
        "--socket-mode needs --socket-path"
    );
    assert_eq!(
        parse(&[
            "--socket-path",
            "/x",
            "--emulate",
            "edu",
            "--socket-mode",
            "0666"
        ]),
        Err(ConfigError::Socket(socket::SocketError::OthersWrite(0o666)))
    );
}
