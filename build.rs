//! Build script: the shared library's SONAME, and ggml's CPU kernels in more variants than the
//! one llama-cpp-sys-2 builds, so that one build runs the best kernels of the CPU it lands on.
//!
//! llama-cpp-sys-2 builds ggml's CPU backend once, for the target's baseline ISA (AVX2 on
//! x86_64, the board's -march on aarch64). Here the same sources are compiled again with each
//! variant's flags (the compile commands are llama-cpp-sys-2's own, from its CMake build), every
//! symbol they define is renamed with the variant's prefix (so the copies never meet, not even
//! their C++ inline functions), and they go into one static archive. `src/ggml/kernels.rs` picks, at run
//! time, the best variant whose features the CPU and the OS support (std's feature detection),
//! else the baseline. PHI4_CPU_VARIANTS=none builds the baseline only (a minimal single-ISA
//! library, as the per-board profiles in ports/ ask for).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A variant of ggml's CPU backend: the CPU features it needs (names of std's
/// `is_*_feature_detected!`) and how to compile it.
struct Variant {
    name: &'static str,
    features: &'static [&'static str],
    /// Compiler flags and ggml's defines, added after the baseline's (x86).
    flags: &'static [&'static str],
    /// The -march of an aarch64 variant.
    arm_arch: Option<&'static str>,
}

const AVX512: [&str; 5] = [
    "-mavx512f",
    "-mavx512cd",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512bw",
];

/// Best first. (No AMX variant: its tiles need the OS's permission per process, and a kernel
/// that lacks it faults.)
const X86_64: &[Variant] = &[
    Variant {
        name: "avx512_bf16",
        features: &[
            "avx512f",
            "avx512cd",
            "avx512vl",
            "avx512dq",
            "avx512bw",
            "avx512vbmi",
            "avx512vnni",
            "avx512bf16",
        ],
        flags: &[
            AVX512[0],
            AVX512[1],
            AVX512[2],
            AVX512[3],
            AVX512[4],
            "-mavx512vbmi",
            "-mavx512vnni",
            "-mavx512bf16",
            "-DGGML_AVX512",
            "-DGGML_AVX512_VBMI",
            "-DGGML_AVX512_VNNI",
            "-DGGML_AVX512_BF16",
        ],
        arm_arch: None,
    },
    Variant {
        name: "avx512_vnni",
        features: &[
            "avx512f",
            "avx512cd",
            "avx512vl",
            "avx512dq",
            "avx512bw",
            "avx512vbmi",
            "avx512vnni",
        ],
        flags: &[
            AVX512[0],
            AVX512[1],
            AVX512[2],
            AVX512[3],
            AVX512[4],
            "-mavx512vbmi",
            "-mavx512vnni",
            "-DGGML_AVX512",
            "-DGGML_AVX512_VBMI",
            "-DGGML_AVX512_VNNI",
        ],
        arm_arch: None,
    },
    Variant {
        name: "avx512",
        features: &["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"],
        flags: &[
            AVX512[0],
            AVX512[1],
            AVX512[2],
            AVX512[3],
            AVX512[4],
            "-DGGML_AVX512",
        ],
        arm_arch: None,
    },
];

const AARCH64: &[Variant] = &[
    Variant {
        name: "i8mm",
        features: &["dotprod", "fp16", "i8mm"],
        flags: &[],
        arm_arch: Some("armv8.6-a+dotprod+fp16+i8mm"),
    },
    Variant {
        name: "dotprod",
        features: &["dotprod", "fp16"],
        flags: &[],
        arm_arch: Some("armv8.2-a+dotprod+fp16"),
    },
];

fn main() {
    let major = env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" || target_os == "android" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libphi4.so.{major}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PHI4_CPU_VARIANTS");
    println!("cargo:rerun-if-env-changed=PHI4_ARM_ARCH");

    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let variants: &[Variant] = match (
        arch.as_str(),
        target_os.as_str(),
        env::var("PHI4_CPU_VARIANTS").as_deref(),
    ) {
        (_, _, Ok("none")) => &[],
        ("x86_64", "linux", _) => X86_64,
        ("aarch64", "linux", _) => AARCH64,
        _ => &[],
    };
    let target_features = env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let has = |f: &str| target_features.split(',').any(|t| t == f);
    let baseline = match arch.as_str() {
        "x86_64" if has("avx512f") => "avx512".to_string(),
        "x86_64" if has("avx2") => "avx2".to_string(),
        "x86_64" => "x86-64".to_string(),
        "aarch64" => env::var("PHI4_ARM_ARCH")
            .ok()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "armv8-a".into()),
        other => other.to_string(),
    };
    // Under clippy (a check: nothing is linked) only the table below is needed; the C is compiled
    // by the build that links it. Clippy's units are its own (cargo hashes the wrapper in), so a
    // later build never takes this run's output for a full one.
    println!("cargo:rerun-if-env-changed=RUSTC_WORKSPACE_WRAPPER");
    let checking = env::var("RUSTC_WORKSPACE_WRAPPER").is_ok_and(|w| w.contains("clippy-driver"));
    if !checking {
        build_variants(variants, &out);
    }
    // The table src/ggml/kernels.rs includes: the baseline's name, then each variant.
    let mut table = format!("cpu_variants! {{ baseline: {baseline:?};\n");
    for v in variants {
        let features = v
            .features
            .iter()
            .map(|f| format!("{f:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        table += &format!("    {}: {:?}, [{features}];\n", v.name, v.name);
    }
    table += "}\n";
    fs::write(out.join("cpu_variants.rs"), table).unwrap();
}

/// Compile phi4's kernels for the baseline, and compile, rename and archive every variant (ggml's
/// CPU backend and phi4's kernels).
fn build_variants(variants: &[Variant], out: &Path) {
    // llama-cpp-sys-2 says where its CMake package is: <out>/lib/cmake; the build is <out>/build.
    let cmake_dir = env::var("DEP_LLAMA_GGML_CMAKE_DIR")
        .expect("llama-cpp-sys-2 says where its build is (DEP_LLAMA_GGML_CMAKE_DIR)");
    let commands_file = Path::new(&cmake_dir).join("../../build/compile_commands.json");
    println!("cargo:rerun-if-changed={}", commands_file.display());
    let commands: Vec<serde_json::Value> =
        match fs::read(&commands_file).map(|b| serde_json::from_slice(&b)) {
            Ok(Ok(c)) => c,
            _ => panic!(
                "cannot read {} (llama-cpp-sys-2's compile commands)",
                commands_file.display()
            ),
        };
    // The CPU backend's sources: the commands of CMake's ggml-cpu target.
    let cpu: Vec<(String, String)> = commands
        .iter()
        .filter_map(|c| {
            Some((
                c["directory"].as_str()?.to_string(),
                c["command"].as_str()?.to_string(),
            ))
        })
        .filter(|(_, cmd)| cmd.contains(" CMakeFiles/ggml-cpu.dir/"))
        .collect();
    assert!(
        cpu.len() >= 10,
        "unexpected compile commands in {}: {} for ggml-cpu",
        commands_file.display(),
        cpu.len()
    );

    // phi4's own kernels (src/ggml/matmul.c), compiled as ggml's C sources are: the baseline's
    // copy keeps its names, each variant's is renamed with the variant's ggml.
    let matmul = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ggml/matmul.c");
    println!("cargo:rerun-if-changed={}", matmul.display());
    let c_command = cpu
        .iter()
        .find(|(_, cmd)| cmd.trim_end().ends_with("ggml-cpu.c"))
        .expect("ggml-cpu.c is compiled");
    let mut words: Vec<&str> = c_command.1.split_whitespace().collect();
    let matmul_path = matmul.to_string_lossy().into_owned();
    *words.last_mut().unwrap() = &matmul_path;
    // Unrolled: the kernels keep each token's sums in registers only when loops are unrolled.
    words
        .iter_mut()
        .filter(|w| w.starts_with("-O"))
        .for_each(|w| *w = "-O3");
    let matmul_command = (c_command.0.clone(), words.join(" "));
    let base = Variant {
        name: "base",
        features: &[],
        flags: &[],
        arm_arch: None,
    };
    let (mut cmd, base_obj) = variant_command(&base, &matmul_command.0, &matmul_command.1, out, 0);
    run(&mut cmd);

    let tools = Tools::new();
    let mut objects = vec![base_obj];
    for v in variants {
        let dir = out.join(format!("cpu-{}", v.name));
        fs::create_dir_all(&dir).unwrap();
        let jobs: Vec<(Command, PathBuf)> = cpu
            .iter()
            .chain([&matmul_command])
            .enumerate()
            .map(|(i, (cwd, cmd))| variant_command(v, cwd, cmd, &dir, i))
            .collect();
        let objs = run_parallel(jobs);
        rename_symbols(&tools, v, &objs, &dir);
        objects.extend(objs);
    }
    let lib = out.join("libphi4_cpu_variants.a");
    let _ = fs::remove_file(&lib);
    let mut ar = Command::new(&tools.ar);
    ar.arg("crs").arg(&lib).args(&objects);
    run(&mut ar);
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=phi4_cpu_variants");
}

/// The baseline's compile command with the variant's flags, writing `dir/<variant>-<i>-<file>.o`.
fn variant_command(v: &Variant, cwd: &str, cmd: &str, dir: &Path, i: usize) -> (Command, PathBuf) {
    let mut words: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
    // No debug info: smaller, faster to build (the shipped library is stripped anyway).
    words.retain(|w| w != "-g");
    let o = words
        .iter()
        .position(|w| w == "-o")
        .expect("a compile command has -o");
    let source = words.last().unwrap().clone();
    let stem = Path::new(&source)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let obj = dir.join(format!("{}-{i}-{stem}.o", v.name));
    words[o + 1] = obj.to_string_lossy().into_owned();
    let mut extra: Vec<String> = v.flags.iter().map(|f| f.to_string()).collect();
    if let Some(a) = v.arm_arch {
        extra.push(format!("-march={a}"));
    }
    words.splice(o..o, extra);
    let mut c = Command::new(&words[0]);
    c.args(&words[1..]).current_dir(cwd);
    if let Some(a) = v.arm_arch {
        // ports/aarch64-cc appends the board's -march last: make it the variant's.
        c.env("PHI4_ARM_ARCH", a);
    }
    (c, obj)
}

/// Run the commands, as many at once as cargo allows; their outputs.
fn run_parallel(jobs: Vec<(Command, PathBuf)>) -> Vec<PathBuf> {
    let n = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2usize)
        .max(1);
    let outputs: Vec<PathBuf> = jobs.iter().map(|(_, o)| o.clone()).collect();
    let queue = std::sync::Mutex::new(jobs.into_iter());
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| loop {
                let next = queue.lock().unwrap().next();
                let Some((mut cmd, _)) = next else { break };
                run(&mut cmd);
            });
        }
    });
    outputs
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Prefix every symbol the variant's objects define (functions, data, C++ inline functions and
/// their COMDAT groups) with `phi4_<variant>_`; references to ggml's base library stay.
fn rename_symbols(tools: &Tools, v: &Variant, objs: &[PathBuf], dir: &Path) {
    let mut nm = Command::new(&tools.nm);
    nm.args(["--defined-only", "--format=posix"]).args(objs);
    let listing = nm
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tools.nm));
    assert!(
        listing.status.success(),
        "{} failed: {}",
        tools.nm,
        String::from_utf8_lossy(&listing.stderr)
    );
    let mut names: Vec<&str> = std::str::from_utf8(&listing.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.ends_with(':') && !l.is_empty())
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (name, kind) = (w.next()?, w.next()?);
            // Global and weak definitions, and COMDAT group signatures (local symbols of the
            // non-allocated .group sections, "n"): the linker keeps one group per signature
            // across all objects, so an unrenamed one would drop the baseline's copy.
            (kind.chars().all(|c| c.is_ascii_uppercase()) || kind == "n").then_some(name)
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    let map: String = names
        .iter()
        .map(|n| format!("{n} phi4_{}_{n}\n", v.name))
        .collect();
    let map_file = dir.join("rename.map");
    fs::write(&map_file, map).unwrap();
    for o in objs {
        let mut c = Command::new(&tools.objcopy);
        c.arg(format!("--redefine-syms={}", map_file.display()))
            .arg(o);
        run(&mut c);
    }
}

/// binutils for the target: $NM/$OBJCOPY/$AR, or the cross prefix of a cross build.
struct Tools {
    nm: String,
    objcopy: String,
    ar: String,
}

impl Tools {
    fn new() -> Tools {
        let (target, host) = (
            env::var("TARGET").unwrap_or_default(),
            env::var("HOST").unwrap_or_default(),
        );
        let prefix =
            if target != host && target.starts_with("aarch64-") && target.ends_with("-linux-gnu") {
                "aarch64-linux-gnu-"
            } else {
                ""
            };
        let tool = |var: &str, name: &str| {
            println!("cargo:rerun-if-env-changed={var}");
            env::var(var).unwrap_or_else(|_| format!("{prefix}{name}"))
        };
        Tools {
            nm: tool("NM", "nm"),
            objcopy: tool("OBJCOPY", "objcopy"),
            ar: tool("AR", "ar"),
        }
    }
}
