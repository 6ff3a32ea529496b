//! ACPI power button -> power-off request.
//!
//! QEMU's `system_powerdown` (QMP) raises the ACPI power button; the kernel's
//! button driver (CONFIG_ACPI_BUTTON + CONFIG_INPUT_EVDEV) reports it as
//! KEY_POWER on an evdev device named "Power Button". A thread blocks reading
//! that device and turns a press into SIGPWR to PID 1, which the main loop
//! handles like any other power-off signal. This gives the host a graceful
//! shutdown that works without envd.

use std::io::Read;

use crate::sys::log;

const EV_KEY: u16 = 0x01;
const KEY_POWER: u16 = 116;

fn find_power_button() -> Option<String> {
    let entries = std::fs::read_dir("/sys/class/input").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let dev_name =
            std::fs::read_to_string(entry.path().join("device/name")).unwrap_or_default();
        if dev_name.trim() == "Power Button" {
            return Some(format!("/dev/input/{name}"));
        }
    }
    None
}

pub fn watch() {
    let Some(path) = find_power_button() else {
        log("no ACPI power button; power off with a signal to PID 1");
        return;
    };
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            log(&format!("open {path}: {e}"));
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("power-button".into())
        .spawn(move || {
            // struct input_event on x86_64: timeval (16 bytes), type u16, code u16, value i32.
            let mut buf = [0u8; 24];
            loop {
                if let Err(e) = file.read_exact(&mut buf) {
                    log(&format!("power button: read: {e}"));
                    return;
                }
                let ty = u16::from_ne_bytes([buf[16], buf[17]]);
                let code = u16::from_ne_bytes([buf[18], buf[19]]);
                let value = i32::from_ne_bytes([buf[20], buf[21], buf[22], buf[23]]);
                if ty == EV_KEY && code == KEY_POWER && value == 1 {
                    log("ACPI power button pressed");
                    // SAFETY: kill(2) on our own process; the main thread consumes
                    // the (blocked) signal with sigwaitinfo.
                    unsafe { libc::kill(libc::getpid(), libc::SIGPWR) };
                }
            }
        });
    if let Err(e) = spawned {
        log(&format!("cannot start power button thread: {e}"));
    }
}
