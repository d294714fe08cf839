//! The `stickylb` binary: parses the command line and hands over to the library.

fn main() {
    std::process::exit(stickylb::cli::main());
}

/// Catches SIGHUP before `main` runs at all: a constructor in `.init_array`, which the dynamic
/// loader calls right after loading the program, before Rust's runtime starts. SIGHUP's
/// default action ends the process, and `systemctl reload` can send one as soon as the
/// process exists (`Type=exec` units are "started" once exec(2) succeeded). What the handler
/// does is in [`stickylb::cli::hold_hangups`]: it only notes the signal (an atomic store), and
/// calls nothing of Rust's runtime, which is not set up yet.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static HOLD_HANGUPS: extern "C" fn() = {
    extern "C" fn hold() {
        stickylb::cli::hold_hangups();
    }
    hold
};
