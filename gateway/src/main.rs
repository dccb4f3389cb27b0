use std::process::ExitCode;

fn main() -> ExitCode {
    let config_path = match cms_kit::service::config_path_from_args("gateway") {
        Ok(path) => path,
        Err(usage) => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    cms_kit::service::main("gateway", config_path.as_deref(), cms_gateway::run)
}
