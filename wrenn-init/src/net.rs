//! Interface setup with plain ioctls (the minbase rootfs has no iproute2).
//!
//! Every capsule has the same guest identity (see the design notes): `eth0`
//! 169.254.0.21/30, gateway 169.254.0.22; the VMM sets the MAC. The kernel's
//! `ip=` parameter (CONFIG_IP_PNP) normally configured `eth0` before init ran;
//! this only fills in what is missing.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::sys::{errno_str, log};

const GUEST_IF: &str = "eth0";
const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
const GUEST_NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 252);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);

/// `struct rtentry` from <net/route.h> (not exported by the libc crate for glibc).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-data C structs;
    // reinterpreting one as the other is how the socket API is used.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ipv4_of(sa: &libc::sockaddr) -> Option<Ipv4Addr> {
    if i32::from(sa.sa_family) != libc::AF_INET {
        return None;
    }
    // SAFETY: same size and plain data, see `sockaddr_v4`; the family says it is IPv4.
    let sin: libc::sockaddr_in = unsafe { std::mem::transmute_copy(sa) };
    Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (array + union of plain data); all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

struct Sock(OwnedFd);

impl Sock {
    fn new() -> Option<Self> {
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            log(&format!("socket(AF_INET): {}", errno_str()));
            return None;
        }
        // SAFETY: `fd` is a freshly created descriptor nobody else owns.
        Some(Sock(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T) -> Result<(), std::io::Error> {
        // SAFETY: `arg` points to the live struct this request expects
        // (ifreq for SIOC[GS]IF*, rtentry for SIOCADDRT).
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), req as _, arg as *mut T) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn up(&self, name: &str) -> Result<(), std::io::Error> {
        let mut req = ifreq(name);
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        let wanted = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags = wanted;
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }

    fn addr(&self, name: &str) -> Result<Option<Ipv4Addr>, std::io::Error> {
        let mut req = ifreq(name);
        match self.ioctl(libc::SIOCGIFADDR, &mut req) {
            // SAFETY: SIOCGIFADDR filled the `ifru_addr` member.
            Ok(()) => Ok(ipv4_of(unsafe { &req.ifr_ifru.ifru_addr })),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn set_addr(&self, name: &str, addr: Ipv4Addr, mask: Ipv4Addr) -> Result<(), std::io::Error> {
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
        self.ioctl(libc::SIOCSIFADDR, &mut req)?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_netmask = sockaddr_v4(mask);
        self.ioctl(libc::SIOCSIFNETMASK, &mut req)
    }

    fn add_default_route(&self, gateway: Ipv4Addr) -> Result<(), std::io::Error> {
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_v4(gateway),
            rt_genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        match self.ioctl(libc::SIOCADDRT, &mut rt) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }
}

/// Whether /proc/net/route already has a default route.
fn has_default_route() -> bool {
    std::fs::read_to_string("/proc/net/route")
        .map(|s| {
            s.lines()
                .skip(1)
                .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
        })
        .unwrap_or(false)
}

pub fn configure() {
    let Some(sock) = Sock::new() else { return };
    if let Err(e) = sock.up("lo") {
        log(&format!("lo up: {e}"));
    }
    match sock.addr(GUEST_IF) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
            log(&format!("no {GUEST_IF}: running without network"));
            return;
        }
        Err(e) => {
            log(&format!("{GUEST_IF}: cannot read address: {e}"));
            return;
        }
        Ok(Some(addr)) if addr == GUEST_ADDR => {}
        Ok(current) => {
            log(&format!(
                "{GUEST_IF}: address {} -> configuring {GUEST_ADDR}/30 gw {GATEWAY}",
                current
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "none".into())
            ));
            if let Err(e) = sock.set_addr(GUEST_IF, GUEST_ADDR, GUEST_NETMASK) {
                log(&format!("{GUEST_IF}: set address: {e}"));
            }
        }
    }
    if let Err(e) = sock.up(GUEST_IF) {
        log(&format!("{GUEST_IF} up: {e}"));
    }
    if !has_default_route() {
        if let Err(e) = sock.add_default_route(GATEWAY) {
            log(&format!("default route via {GATEWAY}: {e}"));
        }
    }
    log(&format!(
        "network: lo up, {GUEST_IF} {GUEST_ADDR}/30 gw {GATEWAY}"
    ));
}
