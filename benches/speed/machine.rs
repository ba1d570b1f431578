//! What the figures were measured on: CPU model, cores, the SIMD extensions that matter to
//! inference kernels, memory, and which kernels lmx picked.

/// Extensions worth naming, in the order they are printed (names as in /proc/cpuinfo).
const SIMD_FLAGS: &[&str] = &[
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "neon",
    "asimd",
    "sve",
];

pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub simd: Vec<&'static str>,
    pub memory_gib: f64,
    /// The kernels lmx's engine chose on this CPU, when the engine can say.
    pub lmx_kernels: Option<String>,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        };
        let flags = field("flags")
            .or_else(|| field("Features"))
            .unwrap_or_default();
        let flags: Vec<&str> = flags.split_whitespace().collect();
        let memory_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        Machine {
            cpu: field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_owned()),
            cores: cores(),
            simd: SIMD_FLAGS
                .iter()
                .copied()
                .filter(|f| flags.contains(f))
                .collect(),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            lmx_kernels: lmx_kernels(),
        }
    }

    pub fn print(&self) {
        println!(
            "Machine: {}, {} cores, {:.0} GiB",
            self.cpu, self.cores, self.memory_gib
        );
        println!("  SIMD: {}", self.simd.join(" "));
        match &self.lmx_kernels {
            Some(k) => println!("  lmx kernels: {k}"),
            None => println!("  lmx kernels: (the engine does not describe them yet)"),
        }
        if let Ok(cap) = std::env::var("LMX_KERNELS") {
            println!("  LMX_KERNELS={cap}");
        }
    }
}

/// Threads every engine gets: one per core the process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The engine's own account of the kernels it dispatches to on this CPU (None: an engine that
/// cannot say; the header then says so).
fn lmx_kernels() -> Option<String> {
    Some(lmx::engine::kernels::describe_cpu())
}

/// Clock ticks per second of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// User + system CPU seconds of a process from /proc/PID/stat (all its threads), plus those of
/// its children that have been waited for when `children` is set.
pub fn process_cpu_seconds(pid: &str, children: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm)": state is field 3; utime, stime, cutime, cstime are 14..=17.
    let fields: Vec<f64> = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse().ok())
        .collect();
    let ticks: f64 = if children {
        fields.iter().sum()
    } else {
        fields.iter().take(2).sum()
    };
    Some(ticks / clock_ticks())
}

/// Busy and total CPU seconds of the whole machine, from /proc/stat.
fn machine_cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let times: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8) // user nice system idle iowait irq softirq steal
        .filter_map(|t| t.parse().ok())
        .collect();
    let idle = times.get(3)? + times.get(4).unwrap_or(&0.0);
    let total: f64 = times.iter().sum();
    Some(((total - idle) / clock_ticks(), total / clock_ticks()))
}

/// Measures how much of the machine other work used while an engine ran: the machine's busy
/// time minus ours (this process, its waited-for children, and any process named in `ours`).
/// Anything above a few % makes that engine's figures low; the report flags it.
pub struct LoadMeter {
    busy: f64,
    total: f64,
    ours: f64,
}

impl LoadMeter {
    /// `ours`: CPU seconds so far of our processes that this process does not wait for.
    pub fn start(ours: f64) -> Option<LoadMeter> {
        let (busy, total) = machine_cpu_seconds()?;
        let own = process_cpu_seconds("self", true)?;
        Some(LoadMeter {
            busy,
            total,
            ours: own + ours,
        })
    }

    /// Share of the machine (0..1) busy with other work since `start`.
    pub fn other_share(&self, ours: f64) -> Option<f64> {
        let (busy, total) = machine_cpu_seconds()?;
        let own = process_cpu_seconds("self", true)? + ours;
        (total > self.total)
            .then(|| ((busy - self.busy) - (own - self.ours)).max(0.0) / (total - self.total))
    }
}
