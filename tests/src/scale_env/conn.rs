//! The client side of the scale instances' line protocol: every line `L`
//! sent is answered `ID L` by the instance holding the connection.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};

/// Timeout of the connect and of every read and write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection to an instance (through the VIP or directly), with the
/// id of the instance that answered its first line.
#[derive(Debug)]
pub struct LineConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The instance serving this connection.
    pub instance: String,
    /// Lines exchanged so far.
    pub exchanged: u64,
    /// The client's local address (its flow).
    pub local: SocketAddr,
}

impl LineConn {
    /// Connects to `to` (the socket belongs to the calling thread's
    /// namespace) and exchanges a first line to learn the instance.
    pub fn open(to: SocketAddr, tag: &str) -> Result<LineConn> {
        let s = TcpStream::connect_timeout(&to, IO_TIMEOUT)
            .with_context(|| format!("{tag}: connecting to {to}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        let local = s.local_addr()?;
        let mut c = LineConn {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            instance: String::new(),
            exchanged: 0,
            local,
        };
        let first = format!("{tag} hello");
        c.instance = c
            .send(&first)
            .with_context(|| format!("{tag}: first line"))?;
        Ok(c)
    }

    /// Sends `line`, reads the answer and checks it echoes `line`; returns
    /// the id of the instance that answered.
    fn send(&mut self, line: &str) -> Result<String> {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .context("writing")?;
        let mut answer = String::new();
        let n = (&mut self.reader)
            .take(4096)
            .read_line(&mut answer)
            .context("reading")?;
        ensure!(n > 0, "closed by the peer (EOF) instead of answering");
        let answer = answer.trim_end_matches('\n');
        let (id, echoed) = answer
            .split_once(' ')
            .with_context(|| format!("answer {answer:?} has no instance id"))?;
        ensure!(echoed == line, "answer {answer:?} does not echo {line:?}");
        self.exchanged += 1;
        Ok(id.to_string())
    }

    /// One more exchange; fails unless the same instance answers.
    pub fn exchange(&mut self, line: &str) -> Result<()> {
        let id = self.send(line)?;
        if id != self.instance {
            bail!(
                "answered by {id}, but the connection was served by {}",
                self.instance
            );
        }
        Ok(())
    }

    /// Closes cleanly: half-close, then read to the instance's own close.
    /// Any error (a reset) or stray data is reported.
    pub fn close(mut self) -> Result<()> {
        self.writer
            .shutdown(Shutdown::Write)
            .context("half-closing")?;
        let mut rest = Vec::new();
        self.reader
            .read_to_end(&mut rest)
            .context("reading to the end")?;
        ensure!(
            rest.is_empty(),
            "{} unexpected bytes before the close",
            rest.len()
        );
        Ok(())
    }
}
