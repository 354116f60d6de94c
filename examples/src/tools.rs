//! Functions that run external tools the way real scripts do: a shell that daemonizes part of
//! its work with `setsid`, and a helper started with a plain `std::process::Command` (not
//! through `Context::spawn`). The runtime ends all of it with the task, however it was
//! started (see ARCHITECTURE.md, "Cancellation and processes"). Each writes the pids it started into `dir` (each file
//! renamed into place whole), then waits for the helper, so only the runtime ends it early.

use chia::Context;
use std::io;
use std::path::Path;

/// The shell: starts a `setsid` daemon that writes its own pid to `dir/daemon`, and waits.
fn shell_script(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "setsid sh -c 'echo $$ > {dir}/daemon.tmp; mv {dir}/daemon.tmp {dir}/daemon; exec sleep 1000' & wait"
    )
}

fn write_pid(dir: &Path, name: &str, pid: u32) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, pid.to_string())?;
    std::fs::rename(tmp, dir.join(name))
}

/// A sync function: the shell through `cx.spawn_std`, the helper through plain
/// `std::process::Command`, then blocks waiting for the helper.
#[chia::function]
pub fn tool_tree_sync(cx: &Context, dir: String) -> Result<String, io::Error> {
    let dir = Path::new(&dir);
    let shell = cx.spawn_std(std::process::Command::new("sh").args(["-c", &shell_script(dir)]))?;
    write_pid(dir, "shell", shell.id())?;
    let mut helper = std::process::Command::new("sleep").arg("1000").spawn()?;
    write_pid(dir, "helper", helper.id())?;
    let status = helper.wait()?;
    Ok(format!("the helper ended: {status}"))
}

/// The same from an async function: the helper through plain `tokio::process::Command`.
#[chia::function]
pub async fn tool_tree_async(cx: &Context, dir: String) -> Result<String, io::Error> {
    let dir = Path::new(&dir);
    let shell = cx.spawn(tokio::process::Command::new("sh").args(["-c", &shell_script(dir)]))?;
    write_pid(dir, "shell", shell.id().unwrap_or(0))?;
    let mut helper = tokio::process::Command::new("sleep").arg("1000").spawn()?;
    write_pid(dir, "helper", helper.id().unwrap_or(0))?;
    let status = helper.wait().await?;
    drop(shell);
    Ok(format!("the helper ended: {status}"))
}
