use std::process::ExitCode;

fn main() -> ExitCode {
    let config_path = match cms_kit::service::config_path_from_args("custody") {
        Ok(path) => path,
        Err(usage) => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    cms_kit::service::main("custody", config_path.as_deref(), cms_custody::run)
}
